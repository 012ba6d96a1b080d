"""VocabDriftCallback with a plain Trainer on a tiny Llama with a trained BPE tokenizer."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from factory import make_llama, read_matrix
from training_helpers import TokenData, load, row_cos, trainer

from vocabdrift.composites.callback import VocabDriftCallback
from vocabdrift.errors import VocabdriftError
from vocabdrift.sources.tokenizer import load_tokenizer, read_vocabulary


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("cb") / "m", dtype="float32")


def _data(base: Path) -> TokenData:
    n = load(base).config.vocab_size
    return TokenData(range(3, n // 3), n=64)


def test_forced_drift_stops_training(base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A learning rate far too hot turns every row within a step or two: the callback stops the run."""
    cb = VocabDriftCallback(base, every=2, stop_below=0.5, tokenizer=base)
    t = cb.attach(trainer(load(base), _data(base), tmp_path / "hot", steps=40, lr=0.5))
    with caplog.at_level(logging.WARNING, logger="vocabdrift"):
        t.train()
    assert t.state.global_step < 40
    assert t.state.global_step == cb.history[-1]["step"]
    assert cb.stop_reason is not None and "stopped training" in cb.stop_reason
    assert "stop_below=0.5" in caplog.text
    assert cb.history[-1]["vocabdrift/lm_head/min_cos"] < 0.5


def test_gentle_run_is_not_stopped(base: Path, tmp_path: Path) -> None:
    cb = VocabDriftCallback(base, every=2, stop_below=0.5, tokenizer=base)
    t = cb.attach(trainer(load(base), _data(base), tmp_path / "cool", steps=6, lr=1e-5))
    t.train()
    assert t.state.global_step == 6 and cb.stop_reason is None
    assert [h["step"] for h in cb.history] == [0, 2, 4, 6]
    assert cb.history[0]["vocabdrift/lm_head/min_cos"] == pytest.approx(1.0, abs=1e-6)  # starts at the base


def test_numbers_match_an_independent_computation(base: Path, tmp_path: Path) -> None:
    cb = VocabDriftCallback(base, every=3, tokenizer=base, threshold=0.99)
    model = load(base)
    t = cb.attach(trainer(model, _data(base), tmp_path / "run", steps=3, lr=3e-3))
    t.train()
    last = cb.history[-1]
    # independent: the saved base file, the live weights, the tokenizer's own flags
    ref = read_matrix(base, "lm_head.weight")
    live = model.get_output_embeddings().weight.detach().double().numpy()
    cos = row_cos(ref, live)
    v = read_vocabulary(load_tokenizer(base), size=ref.shape[0])
    keep = v.reachable & ~v.is_special
    assert last["vocabdrift/lm_head/min_cos"] == pytest.approx(cos[keep].min(), abs=1e-5)
    assert last["vocabdrift/lm_head/mean_cos"] == pytest.approx(cos[keep].mean(), abs=1e-5)
    assert last["vocabdrift/lm_head/below_0.99"] == pytest.approx((cos[keep] < 0.99).mean(), abs=1e-6)
    assert int(last["vocabdrift/lm_head/argmin"]) == int(np.flatnonzero(keep)[cos[keep].argmin()])
    # per category: the Chinese (Han) rows of this tokenizer
    from vocabdrift.analyses.vocab import classify

    cats = np.array([classify(tx, r, is_special=bool(s)) for tx, r, s in zip(v.texts, v.raw, v.is_special,
                                                                              strict=True)])
    jp = keep & (cats == "han")
    assert jp.sum() > 0
    assert last["vocabdrift/lm_head/han/mean_cos"] == pytest.approx(cos[jp].mean(), abs=1e-5)
    # the embedding is measured too, and the numbers reached the trainer's log history
    emb = row_cos(read_matrix(base, "model.embed_tokens.weight"),
                  model.get_input_embeddings().weight.detach().double().numpy())
    assert last["vocabdrift/embed/min_cos"] == pytest.approx(emb[keep].min(), abs=1e-5)
    assert not any(k.startswith("vocabdrift/embed/han/") for k in last)  # per category: lm_head only
    logged = [h for h in t.state.log_history if "vocabdrift/lm_head/min_cos" in h]
    assert [h["step"] for h in logged] == [0, 3]


def test_without_attach_numbers_reach_log_history(base: Path, tmp_path: Path) -> None:
    cb = VocabDriftCallback(base, every=2, tokenizer=base, categories=False)
    t = trainer(load(base), _data(base), tmp_path / "plain", steps=4, lr=1e-3, callbacks=[cb])
    t.train()
    steps = [h["step"] for h in t.state.log_history if "vocabdrift/lm_head/mean_cos" in h]
    assert steps == [0, 2, 4]
    assert not any("/japanese/" in k for h in t.state.log_history for k in h)


def test_alert_warns_without_stopping(base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cb = VocabDriftCallback(base, every=2, alert_below=0.9999, tokenizer=base)
    t = cb.attach(trainer(load(base), _data(base), tmp_path / "alert", steps=4, lr=1e-2))
    with caplog.at_level(logging.WARNING, logger="vocabdrift"):
        t.train()
    assert t.state.global_step == 4 and cb.stop_reason is None
    assert "alert_below=0.9999" in caplog.text and "worst row: token" in caplog.text


def test_wrong_reference_is_a_clear_error(base: Path, tmp_path: Path) -> None:
    other = make_llama(tmp_path / "other", hidden=16, dtype="float32", tokenizer_from=base)
    cb = VocabDriftCallback(other, every=1)
    with pytest.raises(VocabdriftError, match="hidden size 16"):
        cb.setup(load(base))
    with pytest.raises(VocabdriftError, match="every"):
        VocabDriftCallback(base, every=0)


@pytest.mark.slow
def test_trl_sft_trainer_with_callback_and_gate(base: Path, tmp_path: Path) -> None:
    """TRL's SFTTrainer takes the callback (attached) and the gate (LossTermsMixin) like a plain Trainer."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from vocabdrift.composites.remedies import LossTermsMixin, RowGate

    class GatedSFT(LossTermsMixin, SFTTrainer):
        pass

    tok = AutoTokenizer.from_pretrained(base)
    tok.pad_token = tok.eos_token
    ds = Dataset.from_list([{"text": "The quick brown fox jumps over the lazy dog."}] * 16)
    args = SFTConfig(output_dir=str(tmp_path / "o"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                     weight_decay=0.0, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                     disable_tqdm=True, max_length=32)
    cb = VocabDriftCallback(base, every=2)
    t = cb.attach(GatedSFT(model=load(base), args=args, train_dataset=ds, processing_class=tok,
                           loss_terms=[RowGate()]))
    t.train()
    last = cb.history[-1]
    assert [h["step"] for h in cb.history] == [0, 2, 4]
    assert last["vocabdrift/lm_head/latin/min_cos"] < 0.99  # the English targets trained
    assert last["vocabdrift/lm_head/arabic/min_cos"] == pytest.approx(1.0, abs=1e-6)  # absent: gated


def test_attached_numbers_reach_reporting_callbacks(base: Path, tmp_path: Path) -> None:
    """Reporting integrations (TensorBoard, W&B) are callbacks that run before ours; attached, they get the keys."""
    from transformers import TrainerCallback

    seen: list[dict] = []

    class Reporter(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
            seen.append(dict(logs or {}))

    cb = VocabDriftCallback(base, every=2, tokenizer=base)
    t = cb.attach(trainer(load(base), _data(base), tmp_path / "rep", steps=2, lr=1e-3, callbacks=[Reporter()]))
    assert t.callback_handler.callbacks.index(cb) > [type(c) for c in t.callback_handler.callbacks].index(Reporter)
    t.train()
    got = [d for d in seen if "vocabdrift/lm_head/min_cos" in d]
    assert len(got) == 2 and "vocabdrift/lm_head/han/below_0.95" in got[-1]
