"""What adapts to the host: precision=auto, the CPU threads, the throughput meter, and what
TensorBoard shows of a run (HParams rows, attention map titles)."""

from __future__ import annotations

import logging
import types

import pytest
import torch

from transformer import precision as precision_module
from transformer import trainer
from transformer.config import ModelConfig
from transformer.data import prepare_data
from transformer.logging import NullLogger
from transformer.model import build_model
from transformer.precision import Precision, cpu_bf16_support
from transformer.training import host, metrics

CPU = torch.device("cpu")


@pytest.fixture
def bf16_units(monkeypatch):
    """``bf16_units(True)``: make this CPU look as if it had AMX (or, False, neither AMX
    nor AVX-512 BF16); the once-only warning is re-armed."""
    monkeypatch.setattr(precision_module, "_warned_emulated_bf16", False)

    def set_units(native: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return set_units


def test_cpu_bf16_support_names_the_evidence(bf16_units):
    bf16_units(True)
    native, why = cpu_bf16_support()
    assert native and "AMX" in why
    bf16_units(False)
    native, why = cpu_bf16_support()
    assert not native and torch.backends.cpu.get_cpu_capability() in why


def test_auto_precision_trains_in_bf16_only_with_bf16_units(bf16_units):
    bf16_units(True)
    chosen = Precision.resolve("auto", CPU)
    assert chosen.name == "bf16" and "AMX" in chosen.reason
    assert Precision.resolve("auto", CPU, training=False).name == "fp32"  # translation
    bf16_units(False)
    chosen = Precision.resolve("auto", CPU)
    assert chosen.name == "fp32" and "no AMX" in chosen.reason
    assert Precision.resolve("auto", torch.device("cuda")).name == "bf16"


def test_explicit_bf16_without_units_warns_once(bf16_units, caplog):
    bf16_units(False)
    with caplog.at_level(logging.WARNING, logger="transformer.precision"):
        assert Precision.resolve("bf16", CPU).name == "bf16"  # still as asked
        Precision.resolve("bf16", CPU)
    warnings = [r.getMessage() for r in caplog.records if "emulates" in r.getMessage()]
    assert len(warnings) == 1 and "20x slower" in warnings[0]
    caplog.clear()
    bf16_units(True)
    with caplog.at_level(logging.WARNING, logger="transformer.precision"):
        Precision.resolve("bf16", CPU)
    assert not caplog.records


def test_the_recipes_use_auto_precision():
    from omegaconf import OmegaConf

    from tests.test_train import compose_config

    for experiment in ("multi30k_en_de", "multi30k_de_en"):
        cfg = compose_config([f"experiment={experiment}"])
        assert OmegaConf.select(cfg, "trainer.precision") == "auto", experiment


def test_threads_follow_the_setting_then_the_environment_then_the_model(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)),
                        raising=False)
    monkeypatch.setattr(host.os, "getloadavg", lambda: (0.2, 0.0, 0.0), raising=False)
    assert host.choose_threads(3, 512)[0] == 3
    assert host.choose_threads(None, 32) == (1, "model.d_model=32 < 128: too small to split")
    assert host.choose_threads(None, 128)[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun's processes share the cores
    assert host.choose_threads(None, 512)[0] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert host.choose_threads(None, 512)[0] == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(host.os, "getloadavg", lambda: (2.7, 0.0, 0.0), raising=False)
    assert host.choose_threads(None, 512)[0] == 5  # three cores are someone else's
    monkeypatch.setattr(host.os, "getloadavg", lambda: (30.0, 0.0, 0.0), raising=False)
    assert host.choose_threads(None, 512)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert host.choose_threads(None, 512) == (torch.get_num_threads(), "OMP_NUM_THREADS")


def test_tokens_per_second_leave_out_paused_time(monkeypatch):
    clock = iter([100.0, 101.0, 111.0, 112.0, 113.0])  # start, pause in and out, summary, reset
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Meter()
    meter.add(trainer.StepOutput(torch.tensor(2.0), torch.tensor(1.0), 100, torch.tensor(1.0),
                                 torch.tensor(True)))
    with meter.paused():  # 10 s of validation
        pass
    run = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=[{"lr": 1.0}]),
                                device=CPU, flops_per_token=None,
                                scaler=types.SimpleNamespace(is_enabled=lambda: False))
    assert meter.summary(run)["train/tokens_per_s"] == pytest.approx(100 / 2.0)


def test_hparams_name_the_trial_by_its_overrides(monkeypatch):
    from tests.test_train import compose_config

    cfg = compose_config(["model=tiny", "optim.lr=5e-4", "model.n_layers=2"])
    monkeypatch.setattr(metrics, "command_line_overrides",
                        lambda: ["model=tiny", "optim.lr=5e-4", "model.n_layers=2"])
    flat = metrics.flat_hparams(cfg)
    assert list(flat)[:2] == ["optim.lr", "model.n_layers"]  # a group choice is no value
    assert flat["model.n_layers"] == 2 and flat["model.d_model"] == 32
    assert metrics.trial_name("outputs/x") == "model=tiny,optim.lr=5e-4,model.n_layers=2"
    monkeypatch.setattr(metrics, "command_line_overrides",
                        lambda: ["optim.lr=1e-3", "data.cache_dir=/tmp/x", "logger.n_examples=1"])
    assert metrics.trial_name("outputs/x") == "optim.lr=1e-3"
    monkeypatch.setattr(metrics, "command_line_overrides", lambda: [])
    assert metrics.trial_name("outputs/x") == "outputs/x"


class RecordingLogger(NullLogger):
    def __init__(self):
        self.maps = []

    def attention_map(self, tag, weights, x_labels, y_labels, step, title=None):
        self.maps.append((tag, tuple(weights.shape), title))


def test_attention_maps_say_which_layer_and_head(tiny_data_cfg):
    data = prepare_data(tiny_data_cfg, splits=["train", "valid"], log=lambda *_: None)
    torch.manual_seed(0)
    model = build_model(ModelConfig(d_model=16, n_heads=2, n_encoder_layers=3,
                                    n_decoder_layers=2, d_ff=32, max_len=128),
                        data.src_tokenizer.vocab_size, data.tgt_tokenizer.vocab_size).eval()
    logger = RecordingLogger()
    run = types.SimpleNamespace(data=data, model=model, device=CPU, logger=logger,
                                state=types.SimpleNamespace(step=7))
    with torch.inference_mode():
        trainer.log_attention_maps(run, data.splits["valid"])
    titles = {tag: title for tag, _, title in logger.maps}
    assert titles == {
        "attention/encoder_self": "encoder self attention, layer 3 of 3, head 1",
        "attention/decoder_self": "decoder self attention, layer 2 of 2, head 1",
        "attention/cross": "cross attention, layer 2 of 2, head 1"}
