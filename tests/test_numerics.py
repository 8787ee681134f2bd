"""train.amp=auto picks the fastest correct precision for the device; train.deterministic."""

import pytest
import torch

from cancernet.engine import numerics
from cancernet.engine.numerics import cpu_flags, resolve_amp

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [
        ({"avx2", "avx512f", "avx512_bf16"}, "bf16"),  # AVX512-BF16 (e.g. Zen 4, Cooper Lake)
        ({"avx2", "amx_bf16", "amx_tile"}, "bf16"),  # AMX (Sapphire Rapids)
        ({"avx2", "avx512f", "avx512_vnni"}, "off"),  # AVX-512 without bf16: emulated, much slower
        ({"avx2"}, "off"),
        (set(), "off"),
    ],
)
def test_auto_on_a_cpu_uses_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, expected):
    monkeypatch.delenv(numerics.CPU_BF16_ENV, raising=False)
    amp, why = resolve_amp("auto", CPU, flags)
    assert amp == expected and why


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16")])
def test_auto_on_cuda_uses_bf16_from_ampere_on_and_fp16_before(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    assert resolve_amp("auto", torch.device("cuda", 0))[0] == expected


@pytest.mark.parametrize("value, expected", [("0", "off"), ("1", "bf16")])
def test_the_bf16_switch_overrides_the_cpu_flags_for_auto_only(monkeypatch, value, expected):
    monkeypatch.setenv(numerics.CPU_BF16_ENV, value)
    for flags in ({"avx2"}, {"avx512_bf16"}):
        amp, why = resolve_amp("auto", CPU, flags)
        assert amp == expected and numerics.CPU_BF16_ENV in why
    assert resolve_amp("bf16", CPU, set())[0] == "bf16" and resolve_amp("off", CPU, {"amx_bf16"})[0] == "off"


def test_an_explicit_precision_is_kept_on_any_machine():
    for amp in ("bf16", "fp16", "off"):
        assert resolve_amp(amp, CPU, set())[0] == amp


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512_bf16\n\nprocessor\t: 1\n"
    )
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_deterministic_mode_turns_autotuning_off_and_deterministic_kernels_on():
    try:
        numerics.configure(True, CPU)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        numerics.configure(False, torch.device("cuda", 0))
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    finally:
        numerics.configure(False, CPU)


@pytest.mark.slow
def test_a_run_records_the_precision_auto_chose_and_trains_with_the_deterministic_kernels(synth_root, tmp_path):
    import yaml

    from cancernet.train.runner import run

    from conftest import make_cfg, session

    seen = {}

    def look(t, row):
        seen.update(amp=t.cfg.train.amp, deterministic=torch.are_deterministic_algorithms_enabled())

    try:
        with session("cpu") as dist:
            run(
                make_cfg(
                    synth_root,
                    tmp_path,
                    "train.amp=auto",
                    "train.deterministic=true",
                    "data.limit=100",
                    "train.epochs=1",
                ),
                dist,
                on_epoch_end=look,
            )
    finally:
        numerics.configure(False, CPU)
    expected = resolve_amp("auto", CPU)[0]  # bf16 or off, depending on this machine
    assert seen == {"amp": expected, "deterministic": True}
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["amp"] == expected


@pytest.mark.slow
def test_fp16_on_the_cpu_runs_the_grad_scaler_path_of_a_patch_run(synth_root, tmp_path):
    """train.amp=fp16 (what amp=auto gives a pre-Ampere GPU): the loss is scaled and the
    scaler's state goes into last.pt."""
    from cancernet.train.runner import run

    from conftest import make_cfg, session

    with session("cpu") as dist:
        assert run(make_cfg(synth_root, tmp_path, "train.amp=fp16", "data.limit=200", "train.epochs=1"), dist) == "done"
    scaler = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
