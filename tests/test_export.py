"""Export to Hugging Face directories: block-FP8 layout, bit-identical round trips, bf16,
mpx training runs, and the CLI's refusals."""

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mpx
from models import transformer
from models.config import ModelConfig
from mpx import config as mpx_config
from serve import export
from store import checkpoint as ckpt_lib
from store import hf
from store.hf import save as save_lib
from store.hf import tensors
from store.hf import weights as W

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    st = tensors.SafetensorsFile(directory / "model.safetensors")
    return {n: np.array(st.tensor(n)) for n in st.names()}


def _cli(*argv) -> int:
    try:
        return export.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's one-line refusal
        return exit_.code


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tinyllama-fp8"
    assert _cli("--checkpoint", FIXTURES / "tinyllama", "--precision", "fp8", "--out", out) == 0
    return out


def test_fp8_export_has_deepseek_v3s_block_layout(fp8_dir):
    arrays = _tensors(fp8_dir)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == QUANT
    gate = arrays["model.layers.0.mlp.gate_proj.weight"]
    assert gate.dtype == E4M3 and gate.shape == (160, 32)  # (out, in)
    assert arrays["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (2, 1)  # ceil(160/128), ceil(32/128)
    assert arrays["model.layers.0.mlp.gate_proj.weight_scale_inv"].dtype == np.float32
    for name, array in arrays.items():
        quantized = name.endswith("_proj.weight")
        assert array.dtype == (E4M3 if quantized else np.float32 if name.endswith("_scale_inv") else BF16), name
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in fp8_dir.iterdir()}


def test_fp8_weights_dequantize_within_half_an_e4m3_step(fp8_dir):
    source = hf.load(FIXTURES / "tinyllama")
    arrays = _tensors(fp8_dir)
    for name in ("model.layers.1.mlp.gate_proj.weight", "model.layers.0.self_attn.o_proj.weight"):
        entry = next(e for e in W.entries(source.config) if e.hf == name)
        want = W.to_hf(entry, W.get(source.params, entry.path))
        scale = np.repeat(np.repeat(arrays[name + "_scale_inv"], 128, 0), 128, 1)[:want.shape[0], :want.shape[1]]
        got = arrays[name].astype(np.float32) * scale
        # Round to nearest: half a step, 2^-4 relative for normals, 2^-10 * scale for subnormals.
        bound = 2.0**-4 * np.abs(want) + 2.0**-10 * scale
        assert np.all(np.abs(got - want) <= bound)
        assert np.abs(got - want).max() > 0  # it is quantized
        assert np.abs(arrays[name].astype(np.float32)).max() == 448.0  # each block's amax maps to E4M3's max


@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_export_import_export_is_bit_identical(tmp_path, scale_format):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli("--checkpoint", FIXTURES / "qwen3", "--out", a, "--scale-format", scale_format) == 0
    assert _cli("--checkpoint", a, "--out", b, "--scale-format", scale_format) == 0
    assert _same_files(a, b)
    if scale_format == "ue8m0":
        scales = np.concatenate([x.ravel() for n, x in _tensors(a).items() if n.endswith("_scale_inv")])
        assert np.all(np.frexp(scales)[0] == 0.5)  # powers of two
        assert json.loads((a / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"


def test_block_fp8_imports_into_scaled_arrays_without_requantizing(fp8_dir):
    model = hf.load(fp8_dir)
    arrays = _tensors(fp8_dir)
    kernel = model.params["layers_1"]["mlp"]["gate"]["kernel"]
    assert isinstance(kernel, mpx.ScaledArray) and kernel.data.dtype == jnp.float8_e4m3fn
    assert kernel.shape == (32, 160) and kernel.block == (32, 128)  # the (K, N) view
    raw = arrays["model.layers.1.mlp.gate_proj.weight"]
    assert np.asarray(kernel.data).tobytes() == np.ascontiguousarray(raw.T).tobytes()
    np.testing.assert_array_equal(np.asarray(kernel.scale), arrays["model.layers.1.mlp.gate_proj.weight_scale_inv"].T)


def test_bf16_export_is_plain_bf16(tmp_path):
    out = tmp_path / "bf16"
    assert _cli("--checkpoint", FIXTURES / "llama3", "--precision", "bf16", "--out", out) == 0
    assert all(a.dtype == BF16 for a in _tensors(out).values())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ref = np.load(FIXTURES / "llama3" / "reference.npz")
    m = hf.load(out)
    logits = jax.jit(transformer.Transformer(m.config).apply)({"params": m.params}, jnp.asarray(ref["tokens"]))[0]
    err = float(np.abs(np.asarray(logits) - ref["logits"]).max() / np.abs(ref["logits"]).max())
    eps = float(np.finfo(ml_dtypes.bfloat16).eps)
    assert eps / 16 <= err <= 4 * eps  # bf16-rounded weights, f32 compute


def _mpx_run(tmp_path: Path) -> tuple[Path, ModelConfig, dict]:
    """A training-run directory holding one step of a tiny model (tied, scaled embedding)."""
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=160, max_seq_len=32)
    rng, params = np.random.default_rng(0), {}
    for entry in W.entries(config):  # random weights of init's scale, without tracing init
        fan_in = math.prod(entry.shape[:entry.n_in]) if entry.n_in else 1
        W.put(params, entry.path, (rng.standard_normal(entry.shape) / math.sqrt(fan_in)).astype(np.float32))
    params["embed"]["embedding"] *= np.float32(config.d_model**-0.5)
    metadata = {"config": {"model": mpx_config.to_dict(config), "data": {"tokenizer": "bytes"}}}
    ckpt_lib.save(tmp_path / "run" / "checkpoints", 1, {"params": params}, metadata)
    return tmp_path / "run", config, params


def test_an_mpx_training_run_exports_and_computes_the_same_function(tmp_path):
    run, config, params = _mpx_run(tmp_path)
    out = tmp_path / "hf"
    assert _cli("--checkpoint", run, "--precision", "bf16", "--out", out) == 0
    model = hf.load(out)
    assert not model.config.embed_scale and not model.config.tie_embeddings  # sqrt(D) folded into the table
    tokens = jnp.asarray([list(b"hello world, hello mpx")], jnp.int32)
    want = jax.jit(transformer.Transformer(config).apply)({"params": params}, tokens)[0]
    got = jax.jit(transformer.Transformer(model.config).apply)({"params": model.params}, tokens)[0]
    err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
    assert err <= 4 * float(np.finfo(ml_dtypes.bfloat16).eps)
    from store.tokenizer import ModelTokenizer
    assert ModelTokenizer(out / "tokenizer.json").encode("héllo") == list("héllo".encode())


def test_cli_refuses_a_non_empty_out_and_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _cli("--checkpoint", FIXTURES / "qwen2", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--force" in err and "not empty" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert _cli("--checkpoint", FIXTURES / "qwen2", "--out", out, "--force") == 0
    assert "keep.txt" not in {p.name for p in out.iterdir()}


@pytest.mark.parametrize("argv, message", [
    (["--precision", "int4"], "argument --precision: invalid choice: 'int4' (choose from 'fp8', 'bf16')"),
    (["--scale-format", "e5m2"], "argument --scale-format: invalid choice: 'e5m2' (choose from 'float32', 'ue8m0')"),
])
def test_cli_bad_options_exit_2_with_one_line(tmp_path, capsys, argv, message):
    assert _cli("--checkpoint", FIXTURES / "qwen2", "--out", tmp_path / "x", *argv) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "x").exists()


def test_cli_bad_source_writes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"")
    assert _cli("--checkpoint", src, "--out", tmp_path / "x") == 2
    assert "no config.json" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --------------------------------------------------------------------------- shapes that are not multiples of 128

# Every architecture mpx reads, at a hidden size of 200 (a ragged second 128-block), 5
# heads of 40 (a head_dim that does not divide 128), one KV head and an FFN of 136.
RAGGED = dict(hidden_size=200, num_attention_heads=5, head_dim=40, num_key_value_heads=1, intermediate_size=136,
              num_hidden_layers=1, layer_types=["full_attention"])
ARCHITECTURES = ("llama3", "mistral", "qwen2", "qwen3")


def _ragged_fp8_dir(root: Path, name: str) -> tuple[Path, ModelConfig]:
    """A random bf16 Hugging Face directory of fixture `name`'s architecture with RAGGED's
    shapes, exported by `serve.export --precision fp8`."""
    base = {**json.loads((FIXTURES / name / "config.json").read_text()), **RAGGED}
    config = hf.to_model_config(base)
    rng, params = np.random.default_rng(0), {}
    for entry in W.entries(config):
        fan_in = math.prod(entry.shape[:entry.n_in]) if entry.n_in else 1
        W.put(params, entry.path, (rng.standard_normal(entry.shape) / math.sqrt(fan_in)).astype(np.float32))
    src, out = root / f"{name}-bf16", root / f"{name}-fp8"
    save_lib.save(src, config, params, precision="bf16", base_config=base,
            extra_files=save_lib.tokenizer_files(FIXTURES / name))
    assert _cli("--checkpoint", src, "--precision", "fp8", "--out", out) == 0
    return out, config


@pytest.fixture(scope="module")
def ragged(tmp_path_factory):
    root = tmp_path_factory.mktemp("ragged")
    return {name: _ragged_fp8_dir(root, name) for name in ARCHITECTURES}


def _dequantized(directory: Path, name: str) -> np.ndarray:
    """weight * weight_scale_inv of a block-FP8 tensor, computed here in numpy (ragged blocks cut off)."""
    arrays = _tensors(directory)
    weight, scale = arrays[name].astype(np.float32), arrays[name + "_scale_inv"]
    return weight * np.repeat(np.repeat(scale, 128, 0), 128, 1)[:weight.shape[0], :weight.shape[1]]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ragged_block_fp8_reloads_at_every_precision(ragged, name):
    from serve import quantize as q
    from serve import sources
    directory, config = ragged[name]
    assert _tensors(directory)["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (2, 2)  # 128 + 72
    want = _dequantized(directory, "model.layers.0.self_attn.q_proj.weight").T.reshape(200, 5, 40)
    # Converted as loaded (serve.generate) and converted after loading (serve.evaluate, serve.sensitivity).
    _, served, _, _ = sources.load_for_serving(directory, q.ServeSpec("fp32"))
    np.testing.assert_array_equal(np.asarray(served["params"]["layers_0"]["attn"]["q_proj"]["kernel"]), want)
    ckpt = sources.load_checkpoint(directory)
    shapes = q.param_shapes(config)
    for precision in ("fp32", "bf16", "fp8"):
        model, variables = q.prepare(ckpt, q.ServeSpec(precision))
        is_leaf = lambda x: isinstance(x, mpx.ScaledArray)  # noqa: E731
        flat = jax.tree_util.tree_flatten_with_path(variables["params"], is_leaf=is_leaf)[0]
        got = {"/".join(k.key for k in path): leaf for path, leaf in flat}
        assert got.keys() == shapes.keys()
        for key, leaf in got.items():  # FP8 kernels in their 2-D (K, N) view, the rest in the model's shape
            assert (math.prod(leaf.shape), leaf.ndim) == (math.prod(shapes[key]), 2 if isinstance(
                leaf, mpx.ScaledArray) else len(shapes[key])), key
        kernel = got["layers_0/attn/q_proj/kernel"]
        if precision == "fp8":  # kept as stored: E4M3 data and its ragged 128x128 block scales
            assert isinstance(kernel, mpx.ScaledArray) and kernel.scale.shape == (2, 2)
            kernel = kernel.dequantize().reshape(want.shape)
        np.testing.assert_array_equal(np.asarray(kernel, np.float32), want.astype(jnp.dtype(kernel.dtype)))


def test_ragged_block_fp8_serves_at_every_precision(ragged):
    from serve import quantize as q
    from serve import sources
    ckpt = sources.load_checkpoint(ragged["llama3"][0])
    tokens = jnp.asarray([[1, 5, 9, 17, 33, 65, 127, 2]], jnp.int32)
    logits = {}
    for precision in ("fp32", "bf16", "fp8"):
        model, variables = q.prepare(ckpt, q.ServeSpec(precision))
        logits[precision] = np.asarray(jax.jit(model.apply)(variables, tokens)[0])
    err = np.abs(logits["fp8"] - logits["fp32"]).max() / np.abs(logits["fp32"]).max()
    assert err <= 2.5 * float(np.finfo(ml_dtypes.float8_e4m3fn).eps)  # activations quantized on top
    assert np.abs(logits["bf16"] - logits["fp32"]).max() / np.abs(logits["fp32"]).max() < err


def test_ragged_block_fp8_reexports_bit_identically(ragged, tmp_path):
    directory, _ = ragged["qwen3"]
    assert _cli("--checkpoint", directory, "--out", tmp_path / "again") == 0
    assert _same_files(directory, tmp_path / "again")
