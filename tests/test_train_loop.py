"""Training loop: data pipeline, tokenizers, config errors, checkpoints (kill -9 resume, ENOSPC), CLI."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from plainlm.train import data as D
from plainlm.train.loop import (TrainConfig, TrainError, load_checkpoint, save_checkpoint, train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
TEXT = "".join(f"Line {i}: the cat sat on the mat, and the dog ran after the red ball.\n" for i in range(400))
MODEL = dict(dim=32, n_layers=1, n_heads=2, context_length=32)


def _corpus(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "a.txt").write_text(TEXT[:len(TEXT) // 2])
    (d / "sub" / "b.md").write_text(TEXT[len(TEXT) // 2:])
    (d / "empty.txt").write_text("   \n")
    (d / ".hidden").mkdir(exist_ok=True)
    (d / ".hidden" / "x.txt").write_text("secret")
    return d


def _cfg(tmp_path, **kw):
    d = dict(data=[str(_corpus(tmp_path))], out_dir=str(tmp_path / "out"), vocab_size=300, model=MODEL,
             batch_size=4, steps=12, lr=3e-3, warmup=2, eval_every=4, ckpt_every=4, log_every=1, plot=False)
    d.update(kw)
    return TrainConfig.from_dict(d)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def test_directory_corpus_is_recursive_and_skips_hidden(tmp_path):
    d = _corpus(tmp_path)
    names = sorted(f.name for f in D.corpus_files([d]))
    assert names == ["a.txt", "b.md", "empty.txt"]
    assert len(D.read_documents([d])) == 2


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_tokenizers_round_trip(kind, tmp_path):
    docs = [TEXT]
    tok = D.train_tokenizer(kind, docs, 300)
    s = "the cat sat on the mat, and the dog ran"
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    tok2 = D.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert tok2.encode(s) == ids and tok2.vocab_size == tok.vocab_size
    if kind == "bpe":
        assert len(ids) < len(s) / 2 and tok.vocab_size == 300


def test_token_file_header_and_split(tmp_path):
    tok, ntr, nva = D.prepare_data([_corpus(tmp_path)], tmp_path / "d", "char", 0, 0.1)
    tr, v = D.read_tokens(tmp_path / "d" / "train.bin")
    va, _ = D.read_tokens(tmp_path / "d" / "val.bin")
    raw = (tmp_path / "d" / "train.bin").read_bytes()
    assert raw[:8] == b"PLMTOKS\0" and isinstance(tr, np.memmap)
    assert v == tok.vocab_size and len(tr) == ntr and len(va) == nva
    assert abs(nva / (ntr + nva) - 0.1) < 0.01
    assert tok.decode(tr[:20]) == TEXT[:20]
    (tmp_path / "bad.bin").write_bytes(b"nope" * 20)
    with pytest.raises(D.DataError, match="bad magic"):
        D.read_tokens(tmp_path / "bad.bin")


# ------------------------------------------------------------------------------------------------
# configuration errors, before any work
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=-2), "batch_size must be a positive integer"),
    (dict(model=dict(dim=30, n_heads=4)), "must divide dim"),
    (dict(model=dict(dim=-8)), "dim must be a positive integer"),
    (dict(tokenizer="sentencepiece"), "tokenizer must be one of"),
    (dict(data=[]), "no training data"),
    (dict(seq_len=64), "longer than the model's context_length"),
    (dict(lr=-1.0), "lr must be positive"),
])
def test_bad_configs(tmp_path, kw, msg):
    with pytest.raises(TrainError, match=msg):
        train(_cfg(tmp_path, **kw), progress=False, log=lambda s: None)
    assert not (tmp_path / "out" / "ckpt.npz").exists()


def test_empty_and_missing_corpus(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.txt").write_text("\n\n")
    with pytest.raises(TrainError, match="has no text"):
        train(_cfg(tmp_path, data=[str(tmp_path / "e")]), progress=False, log=lambda s: None)
    with pytest.raises(TrainError, match="no such file"):
        train(_cfg(tmp_path, data=[str(tmp_path / "nope.txt")]), progress=False, log=lambda s: None)
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(TrainError, match="tokens"):
        train(_cfg(tmp_path, data=[str(tmp_path / "tiny.txt")], tokenizer="char"), progress=False,
              log=lambda s: None)


def test_unknown_setting():
    with pytest.raises(TrainError, match="unknown training setting"):
        TrainConfig.from_dict({"data": "x", "batchsize": 3})


# ------------------------------------------------------------------------------------------------
# loop, metrics, early stopping
# ------------------------------------------------------------------------------------------------

def test_train_writes_metrics_plot_and_learns(tmp_path):
    res = train(_cfg(tmp_path, steps=16, plot=True), progress=False, log=lambda s: None)
    out = tmp_path / "out"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 16 and len(vals) == 4
    assert losses[-1] < losses[0] - 0.5
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.csv").read_text().splitlines()[0] == "step,loss,val_loss,lr,tok_s"
    assert res["step"] == 16 and (out / "best.npz").exists()


def test_early_stopping(tmp_path):
    # lr so small that validation loss cannot improve by the threshold: stops after `patience` evals
    res = train(_cfg(tmp_path, steps=100, lr=1e-9, min_lr=0.0, warmup=0, eval_every=2, patience=2),
                progress=False, log=lambda s: None)
    assert res["stopped"] == "early_stop" and res["step"] == 6
    meta, _, _ = load_checkpoint(tmp_path / "out" / "ckpt.npz")
    assert meta["step"] == 6


def test_resume_continues_the_same_curve_in_process(tmp_path):
    train(_cfg(tmp_path / "a", steps=12), progress=False, log=lambda s: None)

    class Crash(Exception):
        pass

    def crash_at_step_10(line):
        if line.startswith("step 10/"):
            raise Crash                      # after the step-8 checkpoint, before the step-12 one
    with pytest.raises(Crash):
        train(_cfg(tmp_path / "b", steps=12), progress=False, log=crash_at_step_10)
    assert load_checkpoint(tmp_path / "b" / "out" / "ckpt.npz")[0]["step"] == 8
    train(_cfg(tmp_path / "b", steps=12), progress=False, log=lambda s: None)
    la, lb = (_losses(tmp_path / x / "out") for x in "ab")
    assert sorted(lb) == list(range(1, 13))
    for s in range(1, 13):
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])


def test_checkpoint_write_failure_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "ck.npz"
    P = {"w": np.ones((2, 2), np.float32)}
    save_checkpoint(p, P, None, {"format": "plainlm-train", "version": 1, "step": 1})
    before = p.read_bytes()

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(TrainError, match="No space left on device.*previous checkpoint is intact"):
        save_checkpoint(p, {"w": np.zeros((2, 2), np.float32)}, None, {"step": 2})
    assert p.read_bytes() == before and not (tmp_path / "ck.npz.tmp").exists()
    meta, P2, _ = load_checkpoint(p)
    assert meta["step"] == 1 and P2["w"].sum() == 4


# ------------------------------------------------------------------------------------------------
# kill -9 mid-run, resume, same losses as an uninterrupted run (real subprocesses, the real CLI)
# ------------------------------------------------------------------------------------------------

def _cli(tmp_path, out, steps=40):
    cfg = {"data": [str(tmp_path / "corpus")], "out_dir": str(out), "tokenizer": "char",
           "model": dict(MODEL, context_length=64), "batch_size": 4, "steps": steps, "lr": 3e-3,
           "warmup": 4, "eval_every": 10, "ckpt_every": 5, "log_every": 1, "seed": 3, "plot": False}
    path = tmp_path / f"{out.name}.json"
    path.write_text(json.dumps(cfg))
    env = dict(ENV, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "plainlm", "train", "--config", str(path), "--no-progress"], env


def _losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_kill_minus_9_and_resume_matches_uninterrupted(tmp_path):
    _corpus(tmp_path)
    cmd, env = _cli(tmp_path, tmp_path / "full")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    full = _losses(tmp_path / "full")

    cmd, env = _cli(tmp_path, tmp_path / "killed")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ck = tmp_path / "killed" / "ckpt.npz"
    deadline = time.time() + 240
    while time.time() < deadline:                 # wait for a checkpoint past step 10, then kill -9
        if ck.exists():
            try:
                if load_checkpoint(ck)[0]["step"] >= 10:
                    break
            except TrainError:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ck)[0]["step"]
    assert 10 <= killed_at < 40, killed_at
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stderr
    resumed = _losses(tmp_path / "killed")
    assert sorted(resumed) == list(range(1, 41))
    for s in range(1, 41):
        assert abs(resumed[s] - full[s]) < 1e-5, (s, resumed[s], full[s])


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    _corpus(tmp_path)
    # through plainlm.cli.main's return code (plainlm/__main__.py does not pass it to sys.exit)
    argv = ["train", "--data", str(tmp_path / "corpus"), "--out", str(tmp_path / "o"), "--dim", "30",
            "--heads", "4"]
    r = subprocess.run([sys.executable, "-c", f"import sys; from plainlm.cli import main; sys.exit(main({argv!r}))"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "must divide dim" in r.stderr


def test_cli_sample(tmp_path):
    train(_cfg(tmp_path, steps=4), progress=False, log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "plainlm", "sample", str(tmp_path / "out" / "ckpt.npz"),
                        "-p", "the cat", "-n", "8", "--seed", "1"], capture_output=True, text=True, timeout=120,
                       env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("the cat") and len(r.stdout) > len("the cat")


@pytest.mark.parametrize("model", [
    dict(arch="gpt2", dim=32, n_layers=1, n_heads=2, context_length=32, positions="sinusoidal",
         norm_position="post"),
    dict(arch="gpt2", dim=32, n_layers=1, n_heads=2, context_length=32),
    dict(arch="bitnet", dim=32, n_layers=1, n_heads=2, context_length=32),
])
def test_every_architecture_learns(tmp_path, model):
    train(_cfg(tmp_path, model=model, steps=15, lr=1e-2, eval_every=0), progress=False, log=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert losses[-1] < losses[0] - 0.5, losses


def test_time_limit_stops_with_checkpoint_and_eval(tmp_path):
    res = train(_cfg(tmp_path, steps=50, max_minutes=1e-9), progress=False, log=lambda s: None)
    assert res["stopped"] == "time" and res["step"] == 1 and res["best_val"] == res["val_loss"]
    assert load_checkpoint(tmp_path / "out" / "ckpt.npz")[0]["step"] == 1


def test_toml_config_and_flag_override(tmp_path):
    import argparse

    from plainlm.train import cli as tcli
    _corpus(tmp_path)
    (tmp_path / "c.toml").write_text(f"""
data = ["{tmp_path / 'corpus'}"]
tokenizer = "word"
vocab_size = 50
steps = 7
[model]
arch = "gpt2"
dim = 16
n_heads = 2
positions = "sinusoidal"
""")
    ap = argparse.ArgumentParser()
    tcli.register(ap.add_subparsers())
    args = ap.parse_args(["train", "--config", str(tmp_path / "c.toml"), "--steps", "3", "--layers", "1"])
    tc = tcli.build_config(args)
    assert tc.steps == 3 and tc.tokenizer == "word" and tc.model == dict(arch="gpt2", dim=16, n_heads=2,
                                                                         positions="sinusoidal", n_layers=1)
    (tmp_path / "bad.toml").write_text("steps = [")
    with pytest.raises(Exception, match="cannot parse config"):
        tcli.build_config(ap.parse_args(["train", "--config", str(tmp_path / "bad.toml")]))
