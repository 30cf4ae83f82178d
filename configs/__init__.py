"""mpx's own config files, shipped with the package: training configs (tiny.yaml,
small.yaml, fp32/bf16/fp8.yaml), model files (models/*.yaml) and precision policies
(policies/*.yaml). Commands name them as configs/..., which `mpx.config.locate` finds
here when the working directory has no configs/ of its own."""
