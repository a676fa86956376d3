"""Install dpm_kernels.

    pip install -e .                       # pure Python; C++ kernels compile on first use (needs a C++ compiler)
    DPM_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .
                                           # ahead-of-time build of the CPU extension, and of the CUDA one
                                           # when CUDA PyTorch and nvcc are present (or FORCE_CUDA=1)

torch is imported only for the ahead-of-time build, so a plain install never pulls a torch build of its own.
"""

import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (as dpm_kernels/_csrc) so a non-editable install can JIT-build it."""

    def run(self):
        super().run()
        dst = Path(self.build_lib) / "dpm_kernels" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def ext_modules_and_cmdclass():
    cmdclass = {"build_py": BuildPyWithSources}
    if os.environ.get("DPM_KERNELS_BUILD_EXT") != "1":
        return [], cmdclass
    import torch
    from torch.utils import cpp_extension

    csrc = ROOT / "csrc"
    inc = [str(csrc)]
    exts = [
        cpp_extension.CppExtension(
            "dpm_kernels._cpu",
            [str(p.relative_to(ROOT)) for p in sorted((csrc / "cpu").glob("*.cpp"))],
            include_dirs=inc,
            extra_compile_args=["-O3", "-fopenmp"],  # no -std: torch picks the one its headers need
            extra_link_args=["-fopenmp"],
            define_macros=[("DPM_KERNELS_PYMODULE", "_cpu")],
        )
    ]
    want_cuda = (
        os.environ.get("FORCE_CUDA") == "1"
        or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        or (torch.cuda.is_available() and torch.version.cuda is not None)
    )
    if want_cuda and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # the kernels (*.cu, torch-free) and the binding (*.cpp); not the *.cuh headers
        cuda_srcs = sorted((csrc / "cuda").glob("*.cu")) + sorted((csrc / "cuda").glob("*.cpp"))
        exts.append(
            cpp_extension.CUDAExtension(
                "dpm_kernels._cuda",
                [str(p.relative_to(ROOT)) for p in cuda_srcs],
                include_dirs=inc,
                # no -std: torch adds the standard its headers need (C++20 from torch 2.14); nvcc flags as
                # dpm_kernels/_build.py's cuda_flags (-fmad=false: no multiply-add contraction)
                extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo", "-fmad=false"]},
                define_macros=[("DPM_KERNELS_PYMODULE", "_cuda")],
            )
        )
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)
    return exts, cmdclass


ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="dpm_kernels",
    version="0.1.0",
    description="Fused DPM-Solver / DPM-Solver++ sampling steps: PyTorch reference, C++ CPU, CUDA and Triton kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["dpm_kernels", "dpm_kernels.*"]),
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm"],
    extras_require={
        "plot": ["matplotlib"],  # the demo's picture
        "test": [
            "matplotlib",
            "pytest",
            "hypothesis",
            "diffusers",
            "triton",
            "scipy",
            "torchdiffeq",
            "torchsde",
            "pillow",
            "safetensors",
            "setuptools<81",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["dpm-kernels=dpm_kernels.__main__:main"]},
)
