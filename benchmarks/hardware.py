"""What this machine's accelerator runs natively, and what a policy becomes on it.

    python -m benchmarks.hardware                  # the device, its FP8/BF16 support, notes
    python -m benchmarks.hardware --policy fp8     # plus the policy adapted to it

The detection and the adaptation are `mpx.hardware`'s (`detect`, `describe`,
`adapt_policy`); this program prints them.
"""

from __future__ import annotations

import argparse
import sys

from mpx import hardware
from mpx import policy as policy_lib


def _load_policy(spec: str) -> policy_lib.Policy:
    is_file = spec.endswith((".yaml", ".yml"))
    return policy_lib.load(spec) if is_file else policy_lib.preset(spec)


def main(argv: list[str] | None = None) -> int:
    """CLI: prints `mpx.hardware.describe()`, and with --policy the adapted policy's notes and table.

    Returns:
      The exit status: 0, or 2 after one `error: ...` line for a bad --policy.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hardware", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="a preset name or a policy YAML file to adapt to this hardware")
    args = parser.parse_args(argv)
    try:
        policy = _load_policy(args.policy) if args.policy else None
    except (ValueError, FileNotFoundError) as err:
        print(f"error: --policy: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    info = hardware.detect()
    print(hardware.describe(info))
    if policy is not None:
        adapted, notes = hardware.adapt_policy(policy, info)
        print(f"\npolicy {adapted.name!r} on this hardware:")
        print("\n".join(f"  - {n}" for n in notes) or "  (no changes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
