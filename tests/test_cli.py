"""The mxfp8-moe command and model_config: CPU only (NVRTC compiles for sm_120a without a GPU).

The commands run as `python -m mxfp8_moe` in a subprocess, against a fresh cache directory and with
no GPU visible, so they take the same path on any machine. Input errors are checked in-process
through cli.main, which needs no compile and no interpreter start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mxfp8_moe import cli
from mxfp8_moe.jit.cache import reset_default_cache
from mxfp8_moe.gemm.spec import Variant
from mxfp8_moe.model_config import GemmShape, MoeConfig

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"^(\d+) compiled, (\d+) cached, (\d+) failed in [\d.]+ s$", re.MULTILINE)

QWEN3_30B = {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
             "moe_intermediate_size": 768, "num_experts": 128}
DEEPSEEK_V3 = {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
               "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1}
MIXTRAL_8X7B = {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_local_experts": 8}
GPT_OSS_20B = {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32}


def run_cli(*args: str, cache_dir: Path, settings: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process without a GPU, with `settings` as its only MXFP8_MOE_* variables
    (beside the cache directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MXFP8_MOE_")}  # none of the caller's settings
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               MXFP8_MOE_CACHE_DIR=str(cache_dir), CUDA_VISIBLE_DEVICES="", **(settings or {}))
    return subprocess.run([sys.executable, "-m", "mxfp8_moe", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def summary(result: subprocess.CompletedProcess) -> tuple[int, int, int]:
    assert result.returncode == 0, result.stdout + result.stderr
    (counts,) = SUMMARY.findall(result.stdout)
    return tuple(map(int, counts))


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def prewarmed(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache")
    return cache_dir, run_cli("prewarm", "--arch", "sm_120a", "--shape", "4096,7168", cache_dir=cache_dir)


def test_prewarm_compiles_then_finds_everything_cached(prewarmed):
    cache_dir, first = prewarmed
    compiled, cached, failed = summary(first)
    assert compiled > 1 and (cached, failed) == (0, 0)
    assert len(re.findall(r"^compiled \S+ for sm_120a in [\d.]+ s$", first.stdout, re.MULTILINE)) == compiled
    assert "compiled simt_n4096_k7168_g128_t128 for sm_120a" in first.stdout  # the portable kernel too

    second = run_cli("prewarm", "--arch", "sm_120a", "--shape", "4096,7168", cache_dir=cache_dir)
    assert summary(second) == (0, compiled, 0)
    assert len(re.findall(r"^cached   \S+ for sm_120a$", second.stdout, re.MULTILINE)) == compiled


def test_cache_info_list_clear(prewarmed, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(prewarmed[0], cache_dir)
    compiled = summary(prewarmed[1])[0]

    info = run_cli("cache", "info", cache_dir=cache_dir)
    assert info.returncode == 0
    assert f"directory: {cache_dir}" in info.stdout and "storage:   disk" in info.stdout
    assert f"entries:   {compiled}\n" in info.stdout

    listing = run_cli("cache", "list", cache_dir=cache_dir).stdout.splitlines()
    assert len(listing) == compiled
    assert all(re.fullmatch(r"\S+ sm_120a +[\d.]+ KiB +\d+[smhd]", line) for line in listing), listing

    cleared = run_cli("cache", "clear", cache_dir=cache_dir)
    assert cleared.stdout.strip() == f"removed {compiled} entries from {cache_dir}"
    assert "entries:   0\n" in run_cli("cache", "info", cache_dir=cache_dir).stdout


def test_cache_info_memory_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MXFP8_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MXFP8_MOE_DISABLE_DISK_CACHE", "1")
    reset_default_cache()
    try:
        assert cli.main(["cache", "info"]) == 0
    finally:
        reset_default_cache()  # the next default_cache() rereads the (restored) environment
    assert "storage:   memory only (MXFP8_MOE_DISABLE_DISK_CACHE=1)" in capsys.readouterr().out


@pytest.mark.parametrize("config, tp, expected", [
    ({"model_type": "qwen3_moe", "hidden_size": 256, "intermediate_size": 1024, "moe_intermediate_size": 128,
      "num_experts": 8, "num_experts_per_tok": 2}, 1,
     ["gate_up N=256 K=256 gated (8 experts)", "down N=256 K=128 (8 experts)"]),
    ({"model_type": "deepseek_v3", "hidden_size": 512, "intermediate_size": 4096, "moe_intermediate_size": 256,
      "n_routed_experts": 16}, 2, ["gate_up N=256 K=512 gated (16 experts)", "down N=512 K=128 (16 experts)"]),
], ids=["qwen", "deepseek-tp2"])
def test_prewarm_model_config(tmp_path, config, tp, expected):
    path = write_config(tmp_path / "config.json", config)
    result = run_cli("prewarm", "--arch", "sm_120a", "--model-config", str(path), "--tp", str(tp),
                     cache_dir=tmp_path / "cache")
    compiled, cached, failed = summary(result)
    assert compiled > 2 and (cached, failed) == (0, 0)
    for line in expected:
        assert f"  {line}\n" in result.stdout
    gate_up, down = (re.match(r"\w+ N=(\d+) K=(\d+)", line).groups() for line in expected)
    assert f"compiled simt_n{gate_up[0]}_k{gate_up[1]}_g128_gated_t128 for sm_120a" in result.stdout
    assert f"compiled simt_n{down[0]}_k{down[1]}_g128_t128 for sm_120a" in result.stdout
    # The block around the GEMMs, where the config names the experts per token.
    block = ["route_topk_e8_k2_bf16_renorm", "route_topk_e8_k2_f32_renorm", "combine_rows_h256_k2"]
    assert all((f"compiled {label} for sm_120a" in result.stdout) == ("num_experts_per_tok" in config)
               for label in block), result.stdout


def test_bad_shape_exits_nonzero_with_message(tmp_path):
    result = run_cli("prewarm", "--arch", "sm_120a", "--shape", "100,7168", cache_dir=tmp_path)
    assert result.returncode == 2
    assert "N must be a positive multiple of 16" in result.stderr
    assert "compiled" not in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--shape", "4096,7100"], "K must be a positive multiple of 16"),
    (["--shape", "48,64", "--gated"], "N must be a positive multiple of 32"),
    (["--shape", "4096,7168", "--arch", "sm_70"], "unsupported arch 'sm_70': the kernels need sm_75 or later"),
    (["--shape", "4096,7168", "--arch", "sm_12"], "unsupported arch 'sm_12'"),
    (["--shape", "4096,7168", "--arch", "sm_999"], "unknown arch 'sm_999': NVRTC"),
    (["--shape", "4096,7168", "--arch", "120a"], "unknown arch '120a'"),
    (["--shape", "4096,7168", "--arch", "sm_120a", "--tp", "2"], "--tp splits a --model-config's experts"),
    (["--arch", "sm_120a"], "give --shape N,K or --model-config"),
    (["--arch", "sm_120a", "--model-config", "{missing}"], "No such file"),
    (["--arch", "sm_120a", "--model-config", "{dense}"], "missing num_experts or n_routed_experts or num_local_experts"),
    (["--arch", "sm_120a", "--model-config", "{qwen}", "--tp", "5"], "tp=5 does not split the experts' intermediate "
                                                                      "size 768"),
    (["--arch", "sm_120a", "--model-config", "{qwen}", "--tp", "64"], "tp=64 is too large to split the experts' "
                                                                       "intermediate size 768 into slices that are "
                                                                       "multiples of 16 (each rank would hold 12); tp "
                                                                       "may be 1, 2, 3, 4, 6, 8, 12, 16, 24, 48"),
    (["--arch", "sm_120a", "--model-config", "{not_json}"], "is not valid JSON"),
])
def test_prewarm_input_errors(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.setenv("MXFP8_MOE_CACHE_DIR", str(tmp_path / "cache"))
    paths = {"missing": tmp_path / "missing.json",
             "dense": write_config(tmp_path / "dense.json", {"hidden_size": 4096, "intermediate_size": 11008}),
             "qwen": write_config(tmp_path / "qwen.json", QWEN3_30B),
             "not_json": tmp_path / "not.json"}
    paths["not_json"].write_text("{")
    assert cli.main(["prewarm", *(arg.format(**paths) for arg in args)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("mxfp8-moe prewarm: error: ") and message in err
    assert out == ""


@pytest.mark.parametrize("arch, note", [
    ("sm_120", "note: --arch sm_120 compiles as sm_120a"),
    ("sm_121f", "note: --arch sm_121f compiles as sm_121a"),
    ("sm_100a", "note: sm_100a is not among the GPUs this package lists as supported (README); it would run the "
                "mma.sync kernel, software scales"),
])
def test_prewarm_says_what_an_arch_becomes(monkeypatch, capsys, arch, note):
    compiled = []
    monkeypatch.setattr(cli, "_compile", lambda specs: compiled.extend(specs) or True)
    assert cli.main(["prewarm", "--arch", arch, "--shape", "256,512"]) == 0
    assert note in capsys.readouterr().out
    assert compiled and {spec.arch for spec in compiled} == {note.split()[-1] if "compiles as" in note else arch}


def test_prewarm_notes_nothing_for_listed_archs(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_compile", lambda specs: True)
    assert cli.main(["prewarm", "--arch", "sm_120a", "--arch", "sm_90a", "--arch", "sm_86", "--shape", "256,512"]) == 0
    assert "note:" not in capsys.readouterr().out


def test_prewarm_without_gpu_or_arch_says_to_pass_arch(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["prewarm", "--shape", "4096,7168"]) == 2
    assert "pass --arch" in capsys.readouterr().err


def test_unparsable_shape_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["prewarm", "--shape", "4096"])
    assert exit_info.value.code == 2
    assert "expected N,K" in capsys.readouterr().err


def test_env_without_gpu(tmp_path):
    result = run_cli("env", cache_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    fields = dict(re.match(r"([^:]+):\s+(.*)", line).groups() for line in result.stdout.splitlines())
    assert fields["torch"].startswith(torch.__version__)
    assert re.fullmatch(r"\d+\.\d+ \(.*\)", fields["nvrtc"])
    assert fields["driver"] == "none" or re.fullmatch(r"\d+\.\d+", fields["driver"])
    assert fields["gpu"].startswith("none")
    assert fields["cache"] == str(tmp_path)
    assert fields["MXFP8_MOE_CACHE_DIR"] == str(tmp_path)
    assert fields["scale mode"].startswith("auto: native block-scaled MMA on sm_120a / sm_121a once its first-use check")


def test_env_says_what_is_wrong_with_a_variable(tmp_path):
    result = run_cli("env", cache_dir=tmp_path, settings={"MXFP8_MOE_LOG_LEVEL": "bogus", "MXFP8_MOE_SCALE_MODE": "native",
                                                          "MXFP8_MOE_VALIDAT": "1"})
    assert result.returncode == 0, result.stderr
    assert "MXFP8_MOE_LOG_LEVEL='BOGUS': not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL): ignored" in result.stderr
    fields = dict(re.match(r"([^:]+):\s+(.*)", line).groups() for line in result.stdout.splitlines())
    assert fields["MXFP8_MOE_LOG_LEVEL"] == "bogus (not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL): ignored)"
    assert fields["MXFP8_MOE_VALIDAT"] == "1 (not a variable of this package: ignored)"
    assert fields["MXFP8_MOE_SCALE_MODE"] == "native"
    assert fields["scale mode"] == "native: the block-scaled MMA on sm_120a / sm_121a, without the first-use check"


@pytest.mark.parametrize("command, text", [
    ("env", "Print what this package runs with"),
    ("demo", "--seed SEED seed of the random tokens, weights and routing"),
    ("prewarm", "--tp TP tensor-parallel ranks"),
])
def test_help_describes_commands_and_options(capsys, command, text):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert text in " ".join(capsys.readouterr().out.split())


def test_demo_without_gpu_runs_reference_and_compiles(tmp_path):
    result = run_cli("demo", "--tokens", "4", cache_dir=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every step says what it does and how long it took.
    for step in ("drawing the tokens and weights, quantizing them to MXFP8", "running the reference backend",
                 "compiling the kernel an RTX PRO 6000 (sm_120a) runs for this call"):
        assert re.search(re.escape(step) + r".* \.\.\. \d+\.\d s\n", result.stdout), result.stdout
    error = float(re.search(r"MXFP8 against the unquantized bf16 product: relative error (\S+)", result.stdout)[1])
    assert 0.01 < error < 0.1  # e4m3's rounding: 3 mantissa bits
    assert re.search(r"mma_n1536_k2048_g128_gated_\w+_native: \d+ KiB of sm_120a code", result.stdout), result.stdout
    assert "no GPU here" in result.stdout


# --- model_config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("config, tp, expected", [
    (QWEN3_30B, 1, [GemmShape("gate_up", 1536, 2048, True, 128), GemmShape("down", 2048, 768, False, 128)]),
    (DEEPSEEK_V3, 8, [GemmShape("gate_up", 512, 7168, True, 256), GemmShape("down", 7168, 256, False, 256)]),
    (MIXTRAL_8X7B, 2, [GemmShape("gate_up", 14336, 4096, True, 8), GemmShape("down", 4096, 7168, False, 8)]),
    # gpt-oss: MXFP4 experts with biases, the clamped SwiGLU on the converter's [up; gate] halves.
    (GPT_OSS_20B, 1, [GemmShape("gate_up", 5760, 2880, True, 32, Variant("e2m1", "clamped_swiglu", bias=True)),
                      GemmShape("down", 2880, 2880, False, 32, Variant("e2m1", bias=True))]),
    ({"model_type": "qwen3_vl_moe", "text_config": QWEN3_30B}, 1,
     [GemmShape("gate_up", 1536, 2048, True, 128), GemmShape("down", 2048, 768, False, 128)]),
], ids=["qwen3", "deepseek-v3-tp8", "mixtral-tp2", "gpt-oss", "text-config"])
def test_model_config_shapes(config, tp, expected):
    assert MoeConfig.from_dict(config).gemm_shapes(tp) == expected


@pytest.mark.parametrize("config, missing", [
    ({}, "missing hidden_size; moe_intermediate_size or intermediate_size; "
         "num_experts or n_routed_experts or num_local_experts"),
    ({"hidden_size": 4096, "intermediate_size": 11008, "num_experts": None},
     "missing num_experts or n_routed_experts or num_local_experts"),
    ({"hidden_size": 2048, "num_experts": 64}, "missing moe_intermediate_size or intermediate_size"),
])
def test_model_config_names_missing_keys(config, missing):
    with pytest.raises(ValueError) as error:
        MoeConfig.from_dict(config, source="cfg.json")
    assert str(error.value) == f"cfg.json is not an MoE config this reads: {missing}"


@pytest.mark.parametrize("key, value", [("num_experts", 0), ("hidden_size", "2048"), ("moe_intermediate_size", 1.5),
                                        ("num_experts", True)])
def test_model_config_rejects_bad_values(key, value):
    with pytest.raises(ValueError, match=f"must be a positive integer, got {value!r}"):
        MoeConfig.from_dict({**QWEN3_30B, key: value})


@pytest.mark.parametrize("tp, message", [(5, "tp=5 does not split the experts' intermediate size 768"),
                                         (96, "tp=96 is too large to split"), (0, "tp must be a positive integer")])
def test_model_config_rejects_bad_tp(tp, message):
    with pytest.raises(ValueError, match=message):
        MoeConfig.from_dict(QWEN3_30B).gemm_shapes(tp)


def test_model_config_load(tmp_path):
    assert MoeConfig.load(write_config(tmp_path / "config.json", DEEPSEEK_V3)) == MoeConfig(7168, 2048, 256)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="does not hold a JSON object"):
        MoeConfig.load(tmp_path / "list.json")


def test_prewarm_gpt_oss_compiles_its_w4a8_kernels(tmp_path, monkeypatch, capsys):
    compiled = []
    monkeypatch.setattr(cli, "_compile", lambda specs: compiled.extend(specs) or True)
    path = write_config(tmp_path / "config.json", GPT_OSS_20B)
    assert cli.main(["prewarm", "--arch", "sm_120a", "--model-config", str(path), "--k-granularity", "128"]) == 0
    gemms = [spec for spec in compiled if hasattr(spec, "variant")]
    by_shape = {(s.n, s.gated): s for s in gemms}
    assert by_shape[(5760, True)].variant == Variant("e2m1", "clamped_swiglu", bias=True)
    assert by_shape[(2880, False)].variant == Variant("e2m1", bias=True)
    # The model's kernels are MXFP4 at k granularity 32 (--k-granularity applies to MXFP8 weights);
    # the first-use check's own kernels are MXFP8.
    model = [s for s in gemms if s.n in (5760, 2880)]
    assert {(s.variant.weights, s.k_granularity) for s in model} == {("e2m1", 32)}
    assert "gate_up N=5760 K=2880 gated w4 clamped bias (32 experts)" in capsys.readouterr().out


def test_model_config_reads_the_routing():
    config = MoeConfig.from_dict(dict(QWEN3_30B, num_experts_per_tok=8, norm_topk_prob=False))
    assert (config.top_k, config.renormalize) == (8, False)
    assert (MoeConfig.from_dict(QWEN3_30B).top_k, MoeConfig.from_dict(QWEN3_30B).renormalize) == (None, True)
    with pytest.raises(ValueError, match="num_experts_per_tok must be a positive integer, got 0"):
        MoeConfig.from_dict(dict(QWEN3_30B, num_experts_per_tok=0))
