"""trainer.precision and trainer.compile: bf16 and fp16 steps on the CPU, the gradient scaler's skips
versus real failures, clean config errors, and the compile fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import FAST_DEBUG, run_cli
from nmt.checkpoint import load_checkpoint
from nmt.cli import main
from nmt.config import ModelConfig, OptimConfig, TrainConfig
from nmt.data.batching import EncodedCorpus, collate
from nmt.model.seq2seq import build_model
import nmt.precision
from nmt.precision import (ONEDNN_ROWS, ONEDNN_TOKEN_ROWS, Precision, _with_fallback, compile_decoder_step, extended_rows, has_bf16_matmul,
                           round_up, row_quantum, with_padded_rows)
from nmt.train import build_optimizer, train_step

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def bf16_kernels(monkeypatch):
    """Test the bf16 arithmetic on any CPU: tiny models are quick even where bf16 is emulated."""
    monkeypatch.setattr(nmt.precision, "has_bf16_matmul", lambda device: True)


def setup(precision: str, decoder_layers: int = 1):
    cfg = TrainConfig(model=ModelConfig(embedding_dim=8, hidden_size=6, dropout=0.0, decoder_layers=decoder_layers),
                      optim=OptimConfig(lr=0.01))
    torch.manual_seed(3)
    model = build_model(cfg.model, 30, 30)
    rng = np.random.default_rng(1)
    corpus = EncodedCorpus.from_lists([rng.integers(4, 30, size=n).tolist() for n in (3, 5, 4)],
                                      [rng.integers(4, 30, size=n).tolist() for n in (4, 2, 6)])
    return cfg, model, build_optimizer(model, cfg), collate(corpus, [0, 1, 2]), Precision(precision, CPU)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_a_mixed_precision_step_on_the_cpu_updates_float32_weights_with_a_finite_loss(name):
    cfg, model, optimizer, batch, precision = setup(name)
    before = weights(model)
    result = train_step(model, batch, optimizer, cfg, CPU, precision=precision)
    assert result.status == "ok" and np.isfinite(result.loss) and result.tokens == 15
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights alone
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the loss is close to fp32's on the same weights (bf16 keeps ~3 significant digits)
    cfg, model, optimizer, batch, _ = setup("fp32")
    reference = train_step(model, batch, optimizer, cfg, CPU)
    assert result.loss == pytest.approx(reference.loss, rel=2e-2)


def test_bf16_on_a_cpu_without_bf16_kernels_trains_in_fp32_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(nmt.precision, "has_bf16_matmul", lambda device: False)
    monkeypatch.setattr(nmt.precision, "_WARNED", set())
    with caplog.at_level(logging.WARNING):
        precision = Precision("bf16", CPU)
    assert precision.name == "fp32" and precision.dtype is None and precision.scaler is None
    assert "trainer.precision=bf16" in caplog.text and "trainer.precision=fp32" in caplog.text
    assert Precision("fp16", CPU).dtype == torch.float16  # only bf16 is switched


def test_fp16_uses_a_gradient_scaler_and_bf16_does_not():
    assert setup("fp16")[4].scaler is not None and setup("bf16")[4].scaler is None
    assert setup("fp32")[4].scaler is None


def test_an_fp16_overflow_is_the_scalers_business_not_a_failure():
    cfg, model, optimizer, batch, precision = setup("fp16")
    before = weights(model)
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled gradients overflow
    result = train_step(model, batch, optimizer, cfg, CPU, precision=precision)
    assert result.status == "overflow" and not result.updated and np.isfinite(result.loss)
    assert precision.scaler.get_scale() == 2.0 ** 126  # halved
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_non_finite_gradients_at_a_scale_of_one_are_a_real_failure():
    cfg, model, optimizer, batch, precision = setup("fp16")
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    model.output.weight.register_hook(lambda grad: grad * float("inf"))
    assert train_step(model, batch, optimizer, cfg, CPU, precision=precision).status == "nonfinite"


def test_a_nan_loss_in_fp16_is_a_failure_and_leaves_the_scale_alone():
    cfg, model, optimizer, batch, precision = setup("fp16")
    model.decoder.pre_output.register_forward_hook(lambda module, inputs, out: out * float("nan"))
    result = train_step(model, batch, optimizer, cfg, CPU, precision=precision)
    assert result.status == "nonfinite"
    assert precision.scaler.get_scale() == 2.0 ** 16
    # the scaler's iteration was closed (unscale_ may run again): the next step runs
    assert train_step(model, batch, optimizer, cfg, CPU, precision=precision).status == "nonfinite"


@pytest.mark.parametrize("override, key", [("trainer.precision=fp8", "trainer.precision"),
                                           ("trainer.precision=FP16", "trainer.precision"),
                                           ("trainer.compile=maybe", "trainer.compile"),
                                           ("trainer.dist_timeout=soon", "trainer.dist_timeout")])
def test_bad_precision_or_compile_settings_are_clean_errors(override, key, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: pytest.fail("must not run"), [override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nmt: error: ") and key in err and "Traceback" not in err
    assert err.count("\n") == 1  # one paragraph


def test_precision_error_names_the_choices_from_the_console_script():
    out = run_cli("nmt-train", "trainer.precision=fp8")
    assert out.returncode == 2
    assert "nmt: error: trainer.precision='fp8' is not a valid choice; use one of: fp32, bf16, fp16." in out.stderr


def test_compile_falls_back_to_eager_with_a_warning(caplog):
    model = setup("fp32", decoder_layers=2)[1]

    def broken_compiler(fn, **kwargs):
        raise RuntimeError("no compiler here")

    with caplog.at_level(logging.WARNING, logger="nmt"):
        assert not compile_decoder_step(model, compiler=broken_compiler)
    assert "torch.compile is unavailable (no compiler here); running eagerly" in caplog.text


def test_compile_leaves_a_one_layer_decoder_eager_and_says_why(caplog):
    model = setup("fp32")[1]
    asked = []
    with caplog.at_level(logging.WARNING, logger="nmt"):
        assert not compile_decoder_step(model, compiler=lambda fn, **kwargs: asked.append(fn) or fn)
    assert not asked  # the fused recurrence and the search step never call _advance: compiling it would do nothing
    assert "one-layer decoder trains through its fused recurrence" in caplog.text
    assert "model.decoder_layers=2" in caplog.text


def test_a_compiled_step_that_fails_at_its_first_call_runs_eagerly(caplog):
    def failing(*args):
        raise RuntimeError("backend exploded")

    step = _with_fallback(failing, lambda x: x + 1)
    with caplog.at_level(logging.WARNING, logger="nmt"):
        assert step(1) == 2 and step(2) == 3
    assert caplog.text.count("running eagerly") == 1


@pytest.mark.slow  # compiling takes a minute on a small CPU
def test_a_compiled_decoder_step_trains_like_the_eager_one():
    cfg, model, optimizer, batch, _ = setup("fp32", decoder_layers=2)
    eager = train_step(model, batch, optimizer, cfg, CPU)
    eager_grads = gradients(model)
    cfg, model, optimizer, batch, _ = setup("fp32", decoder_layers=2)
    calls = []

    def counting_compiler(fn, **kwargs):
        compiled_fn = torch.compile(fn, **kwargs)
        return lambda *args: calls.append(1) or compiled_fn(*args)

    assert compile_decoder_step(model, compiler=counting_compiler)
    compiled = train_step(model, batch, optimizer, cfg, CPU)
    assert len(calls) == batch.tgt_in.size(1)  # the compiled step ran once per target position
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)
    # the gradients, not the weights: Adam's first step moves every weight by about lr whatever its
    # gradient's size, so a rounding difference in a near-zero gradient shows up whole in the weight
    for name, grad in gradients(model).items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_nmt_train_in_mixed_precision(precision, shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
                  f"trainer.precision={precision}", "trainer.max_steps=2", "data.val_limit=5",
                  "data.batch_tokens=600")
    assert out.returncode == 0, out.stderr[-3000:]
    if precision == "bf16" and not has_bf16_matmul(CPU):  # an AVX2-only CPU: fp32, and a warning that says so
        assert "precision fp32" in out.stderr and "trainer.precision=bf16: this CPU" in out.stderr
    else:
        assert f"precision {precision}" in out.stderr
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(v.dtype == torch.float32 for v in last["model"].values() if v.is_floating_point())
    assert last["train_state"]["step"] == 2
    assert ("scale" in last["scaler"]) == (precision == "fp16")


def test_row_quantum_rounds_only_where_onednn_runs_the_products():
    """oneDNN runs bf16 and fp16 products on a CPU, and makes a kernel per shape; fp32 (MKL) does not."""
    x = torch.ones(3, 4)
    assert row_quantum(x) == 1 and row_quantum(x.bfloat16()) == ONEDNN_ROWS and row_quantum(x.half()) == ONEDNN_ROWS
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert row_quantum(x) == ONEDNN_ROWS  # the product will run in autocast's dtype
        assert row_quantum(x, tokens=True) == ONEDNN_TOKEN_ROWS and ONEDNN_TOKEN_ROWS % ONEDNN_ROWS == 0
    assert row_quantum(x, tokens=True) == 1
    assert round_up(33, 32) == 64 and round_up(64, 32) == 64 and round_up(5, 1) == 5


def test_extended_rows_reads_the_next_rows_or_pads_with_zeros():
    buffer = torch.arange(2 * 7 * 2, dtype=torch.float32).view(2, 7, 2)
    inside = extended_rows(buffer, 1, 3, 4)  # rows 1-4: the buffer's own, a view
    assert inside.shape == (2, 4, 2) and inside.data_ptr() == buffer[:, 1:].data_ptr()
    beyond = extended_rows(buffer, 5, 2, 4)  # rows 5-6 and two zero rows
    assert torch.equal(beyond[:, :2], buffer[:, 5:]) and torch.equal(beyond[:, 2:], torch.zeros(2, 2, 2))


def test_with_padded_rows_hands_the_function_a_multiple_of_the_quantum_and_returns_the_real_rows():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(6, 4), torch.randn(3, 5, 6, requires_grad=True)
    seen = []
    layer.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = with_padded_rows(layer, x)
        expected = layer(x)
    assert seen == [(ONEDNN_TOKEN_ROWS, 6), (3, 5, 6)]  # 15 rows padded with zeros, then the plain call
    assert out.shape == (3, 5, 4) and torch.equal(out, expected)
    (grad,) = torch.autograd.grad(out.float().sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.float().sum(), x)
    assert torch.equal(grad, expected_grad)
    assert with_padded_rows(layer, x).shape == (3, 5, 4) and seen[-1] == (3, 5, 6)  # fp32: as it is
