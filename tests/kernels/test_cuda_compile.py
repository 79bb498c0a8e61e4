"""NVRTC compilation of every CUDA kernel source (no GPU needed).

Every source of :data:`iirp.kernels.cuda_build.KERNELS`, with every name
expression (kernel and template instantiation), must compile to a cubin for
sm_80 and sm_90 with an empty warning list: the NVRTC front end's warnings and
ptxas's (spills, local memory) all count. Skipped only where cuda.core is not
installed (the ``test`` extra installs it, with a PyPI NVRTC).
"""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("cuda.core")

from iirp.kernels import cuda_build  # noqa: E402 - after the skip

ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module", params=sorted(cuda_build.KERNELS))
def source_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("arch", ARCHS)
def test_every_source_compiles_without_warnings(source_name: str, arch: str) -> None:
    compiled = cuda_build.compile_source(source_name, arch)
    assert compiled.warnings == (), f"{source_name} ({arch}) compiled with warnings:\n{compiled.log}"
    assert compiled.cubin.startswith(b"\x7fELF")
    assert compiled.arch == arch and compiled.name == source_name
    assert compiled.digest == cuda_build.source_digest(source_name)
    assert set(compiled.symbols) == set(cuda_build.KERNELS[source_name])
    assert len(set(compiled.symbols.values())) == len(compiled.symbols)  # one kernel per instantiation


def test_every_cu_file_is_registered() -> None:
    from importlib import resources

    files = {p.name for p in resources.files("iirp.kernels").joinpath("cuda").iterdir() if p.name.endswith(".cu")}
    assert files == set(cuda_build.KERNELS)


def test_compile_is_cached_per_arch() -> None:
    first = cuda_build.compile_source("upsample.cu", "sm_80")
    assert cuda_build.compile_source("upsample.cu", "sm_80") is first
    assert cuda_build.compile_source("upsample.cu", "sm_90") is not first


def test_front_end_warning_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    text = "__global__ void k(float* out) { int unused = 3; out[threadIdx.x] = 1.0f; }\n"
    with caplog.at_level(logging.WARNING, logger="iirp.kernels.cuda_build"):
        compiled = cuda_build.compile_cuda(text, name="unused.cu", arch="sm_80", name_expressions=("k",))
    assert any("unused" in line for line in compiled.warnings), compiled.log
    assert any("unused.cu" in record.getMessage() for record in caplog.records)


def test_ptxas_local_memory_warning_is_reported() -> None:
    text = (
        "__global__ void k(const float* in, float* out, int n) {\n"
        "    float local[64];\n"
        "    for (int j = 0; j < 64; ++j) { local[j] = in[(threadIdx.x + j) % n]; }\n"
        "    out[threadIdx.x] = local[(threadIdx.x * 13) % n];\n"
        "}\n"
    )
    compiled = cuda_build.compile_cuda(text, name="local.cu", arch="sm_90", name_expressions=("k",))
    assert any("ptxas" in line for line in compiled.warnings), compiled.log


def test_fp16_storage_needs_no_cuda_headers() -> None:
    # sampling.cuh converts fp16 with PTX: a PyPI NVRTC has no cuda_fp16.h
    assert "#include <" not in cuda_build.source_text("warp.cu")
    for name in cuda_build.KERNELS:
        assert "#include <" not in cuda_build.source_text(name)


def test_compile_error_carries_the_log() -> None:
    text = "__global__ void k(float* out) { out[0] = undeclared; }\n"
    with pytest.raises(cuda_build.KernelCompileError, match=r"compile_cuda\(\) could not compile bad.cu for sm_80") as info:
        cuda_build.compile_cuda(text, name="bad.cu", arch="sm_80", name_expressions=("k",))
    assert "undeclared" in info.value.log


def test_missing_name_expression_is_an_error() -> None:
    text = "__global__ void k(float* out) { out[0] = 1.0f; }\n"
    with pytest.raises(cuda_build.KernelCompileError, match=r"compile_cuda\(\) could not compile|found no kernel"):
        cuda_build.compile_cuda(text, name="k.cu", arch="sm_80", name_expressions=("k", "not_there"))


@pytest.mark.parametrize("arch", ["compute_80", "80", "sm80", "", None])
def test_bad_arch_is_rejected(arch: object) -> None:
    with pytest.raises(ValueError, match=r"compile_source\(\) 'arch' must look like 'sm_80'"):
        cuda_build.compile_source("warp.cu", arch)  # type: ignore[arg-type]


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"compile_source\(\) 'name' must be one of"):
        cuda_build.compile_source("nope.cu", "sm_80")
    with pytest.raises(ValueError, match=r"source_text\(\) 'name' must be one of"):
        cuda_build.source_text("sampling.cuh")


def test_digest_covers_the_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cuda_build.source_digest("warp.cu")
    real = cuda_build.source_text
    monkeypatch.setattr(cuda_build, "source_text", lambda name: real(name) + "\n// changed\n")
    assert cuda_build.source_digest("warp.cu") != before


def test_ceil_div() -> None:
    assert [cuda_build.ceil_div(n, 256) for n in (0, 1, 255, 256, 257, 512)] == [0, 1, 1, 1, 2, 2]


def test_nvrtc_version() -> None:
    major, minor = cuda_build.nvrtc_version()
    assert major >= 12 and minor >= 0


def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process (an empty in-process cache) loads the cubin from the cache folder instead of running NVRTC."""
    monkeypatch.setenv("IIRP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_build, "_COMPILED", {})
    first = cuda_build.compile_source("upsample.cu", "sm_80")
    path = cuda_build.cubin_cache_path("upsample.cu", "sm_80", first.digest)
    assert path.is_file() and path.read_bytes() == first.cubin and path.parent == tmp_path / "cubin"

    monkeypatch.setattr(cuda_build, "_COMPILED", {})

    def _no_nvrtc(*args: object, **kwargs: object) -> None:
        raise AssertionError("NVRTC ran although the cubin was cached")

    monkeypatch.setattr(cuda_build, "compile_cuda", _no_nvrtc)
    again = cuda_build.compile_source("upsample.cu", "sm_80")
    assert again.cubin == first.cubin and again.symbols == first.symbols and again.log == first.log

    path.write_bytes(b"not a cubin")  # a damaged cache entry is rebuilt, not used
    monkeypatch.setattr(cuda_build, "_COMPILED", {})
    with pytest.raises(AssertionError, match="NVRTC ran"):
        cuda_build.compile_source("upsample.cu", "sm_80")
