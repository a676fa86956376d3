"""Compile recorded Triton launches ahead of time for a GPU architecture, without a GPU.

    python tests/triton_compile_check.py SPECS.json ARCH OUT.json     (TRITON_INTERPRET must be unset)

SPECS.json lists launches as `test_triton_compile.py` records them from the backend's own launcher: the kernel's
name, each positional argument's Triton type and whether it is 16-byte aligned / divisible by 16, the constexpr
meta-parameters and num_warps. Each distinct specialization is compiled with `triton.compile` for
GPUTarget("cuda", ARCH, 32) -- the runtime's own hints: `tt.divisibility` 16 for aligned pointers and integers
divisible by 16, none for `do_not_specialize` arguments -- and its PTX is assembled by ptxas -v. OUT.json gets, per
specialization, the global load/store instruction forms of the PTX and ptxas' registers and spill bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KERNELS = {
    "_step_kernel": ("dpm_kernels.backends.triton_kernels", "_step_kernel"),
    "_select_small": ("dpm_kernels.backends.triton_select", "_select_small"),
    "_hist_pass": ("dpm_kernels.backends.triton_select", "_hist_pass"),
    "_finalize": ("dpm_kernels.backends.triton_select", "_finalize"),
}


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself assembles with for `arch` (its bundled ones: one for sm < 90, a newer one from sm_90)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # another Triton layout: any ptxas on PATH
        return shutil.which("ptxas") or "ptxas"


def compile_spec(spec: dict, arch: int) -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    module, name = KERNELS[spec["kernel"]]
    fn = getattr(importlib.import_module(module), name)
    no_spec = set(getattr(fn, "do_not_specialize", ()) or ())
    no_spec |= {fn.arg_names[i] for i in no_spec if isinstance(i, int)}
    signature, attrs = {}, {}
    for i, (arg_name, (ty, aligned)) in enumerate(zip(fn.arg_names, spec["args"], strict=False)):
        signature[arg_name] = ty
        if aligned and arg_name not in no_spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for k in spec["meta"]:
        signature[k] = "constexpr"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec["meta"]), attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": spec["num_warps"]})
    ptx = k.asm["ptx"]
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # sm_90a from sm_90 on: the arch-specific features
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        res = subprocess.run([ptxas_path(arch), f"-arch={target.group(1) if target else f'sm_{arch}'}", "-v",
                              str(path), "-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    info = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    return {"ok": res.returncode == 0, "ptxas": info[-2000:],
            "regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "accesses": sorted(set(re.findall(r"\b(?:ld|st)\.global[\w.]*", ptx)))}


def main() -> int:
    assert os.environ.get("TRITON_INTERPRET") != "1", "compiling needs the JIT kernels, not the interpreter's"
    specs = json.loads(Path(sys.argv[1]).read_text())
    arch = int(sys.argv[2])
    out = {key: compile_spec(spec, arch) for key, spec in specs.items()}
    Path(sys.argv[3]).write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
