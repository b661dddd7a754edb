"""scripts/setup_cuda.py without a GPU or network: architecture lists, pins, the gencode rewrite.

The fixtures are small setup.py-like programs written here with the layout of mamba-ssm 2.3.2.post1's
and causal-conv1d 1.7.0's gencode blocks (version guards, a TORCH_CUDA_ARCH_LIST reset just before,
a HIP branch with `--offload-arch=`); they run, so a test can see which flags the build would get.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_cuda.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("setup_cuda", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["setup_cuda"] = module
    spec.loader.exec_module(module)
    return module


sc = _load()

MAMBA_LIKE = '''\
import os
SKIP_CUDA_BUILD = False
HIP_BUILD = False
cc_flag = []
if not SKIP_CUDA_BUILD:
    if HIP_BUILD:
        cc_flag.append("-DBUILD_PYTHON_PACKAGE")
        hip = [f"--offload-arch={os.getenv('HIP_ARCHITECTURES', 'native')}"]
    else:
        bare_metal_version = Version("13.0")
        if bare_metal_version[0] != 13:
            os.environ["TORCH_CUDA_ARCH_LIST"] = ""

        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_75,code=sm_75")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_80,code=sm_80")
        if bare_metal_version >= Version("11.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_90,code=sm_90")
        if bare_metal_version >= Version("12.8"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_100,code=sm_100")
        if bare_metal_version >= Version("13.0"):
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_110,code=sm_110")
            cc_flag.append("-gencode")
            cc_flag.append("arch=compute_121,code=sm_121")


    nvcc_args = ["-O3", "--use_fast_math"] + cc_flag
'''

CAUSAL_LIKE = '''\
SKIP_CUDA_BUILD = False
CUDA_HOME = "/usr/local/cuda"
cc_flag = []
if not SKIP_CUDA_BUILD:
    if CUDA_HOME is not None:
        bare_metal_version = Version("12.8")
        if bare_metal_version < Version("11.6"):
            raise RuntimeError(
                "only supported on CUDA 11.6 and above"
            )

    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
    if bare_metal_version >= Version("12.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_120,code=sm_120")
    nvcc_args = ["-O3"] + cc_flag
'''

FIXTURES = {"mamba-like": MAMBA_LIKE, "causal-like": CAUSAL_LIKE}


def _flags(source: str) -> list[str]:
    """The nvcc arguments a fixture program ends with."""
    ns: dict[str, Any] = {"Version": lambda v: tuple(int(x) for x in v.split("."))}
    exec(compile(source, "fixture_setup.py", "exec"), ns)  # noqa: S102 (our own fixture text)
    return ns["nvcc_args"]


def _gencode(*sms: str) -> list[str]:
    return [f for s in sms for f in ("-gencode", f"arch=compute_{s},code=sm_{s}")]


# --- architectures ---------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "expected"), [
    ("8.0,9.0", [(8, 0), (9, 0)]),
    ("90", [(9, 0)]),
    ("9.0, 8.0;120 90", [(8, 0), (9, 0), (12, 0)]),
    ("75,86,10.3", [(7, 5), (8, 6), (10, 3)]),
])
def test_parse_archs(spec: str, expected: list[tuple[int, int]]) -> None:
    assert sc.parse_archs(spec, "--archs") == expected


@pytest.mark.parametrize("bad", ["9", "sm_90", "9.0.1", "", " , ", "nine", "9.x", "7.0", "6.1"])
def test_bad_archs_are_one_line_errors_naming_the_option(bad: str) -> None:
    with pytest.raises(sc.SetupError) as err:
        sc.parse_archs(bad, "--archs")
    message = str(err.value)
    assert message.startswith("--archs:") and "\n" not in message


def test_archs_option_wins_over_the_environment() -> None:
    assert sc.requested_archs("8.0", "9.0") == [(8, 0)]
    assert sc.requested_archs(None, "9.0,8.6") == [(8, 6), (9, 0)]
    assert sc.requested_archs(None, "") is None
    assert sc.requested_archs(None, None) is None
    with pytest.raises(sc.SetupError, match="^GSM_CUDA_ARCHS: 'x' "):
        sc.requested_archs(None, "x")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True,
                          text=True, env=env, timeout=120)


def test_cli_bad_archs_exit_1_with_one_line_no_traceback() -> None:
    result = _cli("--archs", "9,abc")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "setup_cuda: error: --archs: '9' is not a compute capability (expected e.g. 8.0,9.0 or 80,90)"]


def test_cli_bad_env_archs_names_the_variable() -> None:
    result = _cli(env={**os.environ, "GSM_CUDA_ARCHS": "sm_90"})
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "GSM_CUDA_ARCHS: 'sm_90'" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_cli_refuses_a_cpu_torch_even_with_archs() -> None:
    for args in ((), ("--archs", "9.0")):
        result = _cli(*args)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            (f"setup_cuda: error: torch {torch.__version__} is not a CUDA build, and the kernels "
             "need CUDA at run time: install a CUDA build of torch first")]


# --- pins and sdists -------------------------------------------------------------------------


def test_pins_come_from_the_cuda_extra() -> None:
    import tomllib

    raw = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cuda"]
    pins = sc.read_pins(REPO / "pyproject.toml")
    assert [f"{n}=={v}" for n, v in pins] == [r.replace(" ", "") for r in raw]
    assert {sc.normalize(n) for n, _ in pins} == set(sc.KERNELS)


@pytest.mark.parametrize(("extra", "match"), [
    ('cuda = ["mamba-ssm>=2.3"]', "not an exact name==version pin"),
    ('cuda = ["causal-conv1d"]', "not an exact name==version pin"),
    ('test = ["pytest==9.2.0"]', "no \\[project.optional-dependencies\\] cuda list"),
])
def test_bad_pins_are_errors(tmp_path: Path, extra: str, match: str) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\n[project.optional-dependencies]\n{extra}\n')
    with pytest.raises(sc.SetupError, match=match):
        sc.read_pins(pyproject)


def test_find_sdist_matches_normalized_names(tmp_path: Path) -> None:
    for name in ("mamba_ssm-2.3.2.post1.tar.gz", "mamba_ssm-2.3.2.tar.gz", "Causal-Conv1d-1.7.0.tar.gz",
                 "Aaa-1.7.0.tar.gz", "causal_conv1d-1.7.0.zip"):
        (tmp_path / name).touch()
    assert sc.find_sdist(tmp_path, "mamba-ssm", "2.3.2.post1").name == "mamba_ssm-2.3.2.post1.tar.gz"
    assert sc.find_sdist(tmp_path, "causal_conv1d", "1.7.0").name == "Causal-Conv1d-1.7.0.tar.gz"
    with pytest.raises(sc.SetupError, match=r"no sdist of causal-conv1d==1\.6\.0 in"):
        sc.find_sdist(tmp_path, "causal-conv1d", "1.6.0")


def test_extract_gives_the_single_top_directory_afresh(tmp_path: Path) -> None:
    src = tmp_path / "pkg-1.0"
    src.mkdir()
    (src / "setup.py").write_text(CAUSAL_LIKE)
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="pkg-1.0")
    top = sc.extract(sdist, tmp_path / "out")
    (top / "stale.o").touch()
    assert sc.extract(sdist, tmp_path / "out") == top == tmp_path / "out" / "pkg-1.0"
    assert not (top / "stale.o").exists() and (top / "setup.py").read_text() == CAUSAL_LIKE


# --- the gencode rewrite ---------------------------------------------------------------------


@pytest.mark.parametrize("fixture", FIXTURES)
def test_rewrite_builds_exactly_the_requested_archs(fixture: str) -> None:
    text = FIXTURES[fixture]
    assert len(_flags(text)) > 4 + 1  # unpatched: every architecture the fixture lists
    new = sc.rewrite_gencode(text, [(8, 0), (9, 0)])
    assert _flags(new)[-4:] == _gencode("80", "90")
    assert [f for f in _flags(new) if "arch=" in f] == _gencode("80", "90")[1::2]
    assert re.findall(r"compute_(\d+)", new) == ["80", "90"]


@pytest.mark.parametrize("fixture", FIXTURES)
def test_rewrite_leaves_the_rest_alone(fixture: str) -> None:
    text = FIXTURES[fixture]
    new = sc.rewrite_gencode(text, [(9, 0)])
    old_lines, new_lines = text.splitlines(), new.splitlines()
    first = old_lines.index(next(l for l in old_lines if '"-gencode"' in l))
    last = max(i for i, l in enumerate(old_lines) if "arch=compute_" in l)
    assert new_lines[:first] == old_lines[:first]
    assert new_lines[first + 3:] == old_lines[last + 1:]
    assert sc.rewrite_gencode(new, [(8, 6)]) == sc.rewrite_gencode(text, [(8, 6)])


def test_rewrite_fails_loudly_without_the_pattern() -> None:
    text = MAMBA_LIKE.replace('cc_flag.append("-gencode")\n', "").replace('"arch=', '"xarch=')
    with pytest.raises(sc.SetupError, match="list was not found"):
        sc.rewrite_gencode(text, [(9, 0)])
    with pytest.raises(sc.SetupError, match="list was not found"):
        sc.rewrite_gencode("cc_flag = ['-gencode', 'arch=compute_90,code=sm_90']\n", [(9, 0)])


@pytest.mark.parametrize(("change", "match"), [
    # A new statement inside the block: a changed layout we do not understand.
    (('        if bare_metal_version >= Version("12.8"):',
      '        cc_flag.extend(extra)\n        if bare_metal_version >= Version("12.8"):'),
     "unexpected line inside the gencode list"),
    # A gencode flag somewhere else would still be built.
    (("    nvcc_args = [", '    nvcc_args = ["-gencode", "arch=compute_70,code=sm_70", '),
     "a gencode flag outside the list"),
    # The whole list moved under a condition: replacing it would drop the condition's body.
    (('\n        cc_flag.append("-gencode")\n        cc_flag.append("arch=compute_75',
      '\n        if True:\n         cc_flag.append("-gencode")\n         cc_flag.append("arch=compute_75'),
     "opens a conditional block|not one block"),
    # An unequal number of -gencode and arch values.
    (('        cc_flag.append("-gencode")\n        cc_flag.append("arch=compute_80,code=sm_80")',
      '        cc_flag.append("arch=compute_80,code=sm_80")'),
     "flags but"),
])
def test_rewrite_refuses_unknown_layouts(change: tuple[str, str], match: str) -> None:
    old, new = change
    assert old in MAMBA_LIKE
    with pytest.raises(sc.SetupError, match=match):
        sc.rewrite_gencode(MAMBA_LIKE.replace(old, new, 1), [(9, 0)])


def test_rewrite_needs_an_arch() -> None:
    with pytest.raises(sc.SetupError):
        sc.rewrite_gencode(MAMBA_LIKE, [])


@pytest.mark.parametrize("sdist", ["mamba_ssm-2.3.2.post1.tar.gz", "causal_conv1d-1.7.0.tar.gz"])
def test_rewrite_on_the_real_sdist(tmp_path: Path, sdist: str) -> None:
    """Only where the sdists were put in .whl/ (git-ignored; `pip download` them there)."""
    path = REPO / ".whl" / sdist
    if not path.is_file():
        pytest.skip(f"{path} not present")
    top = sc.extract(path, tmp_path)
    sc.patch_setup_py(top, [(9, 0)])
    new = (top / "setup.py").read_text()
    assert re.findall(r"arch=compute_\d+,code=\w+", new) == ["arch=compute_90,code=sm_90"]
    assert (top / "setup.py.orig").read_text().count("arch=compute_") > 1


# --- install bookkeeping ---------------------------------------------------------------------


def test_install_outcome_reads_setup_py_markers() -> None:
    assert sc.install_outcome("Guessing wheel URL: u\nRaw wheel path dist/x.whl\n", False) == "prebuilt wheel"
    assert sc.install_outcome("Precompiled wheel not found. Building from source...\n", False) == "compiled"
    assert sc.install_outcome("Raw wheel path dist/x.whl\n", True) == "compiled"
    assert sc.install_outcome("", False).startswith("unknown")


def test_unreachable_probe_says_why() -> None:
    assert sc.github_reachable("http://127.0.0.1:9/", timeout=2.0) is not None
