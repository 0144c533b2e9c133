"""The numpy reference model against transformers (float32, same GGUF): an independent implementation."""
from __future__ import annotations

import numpy as np
import pytest

from plainlm.generate import GenerationConfig, beam_search, generate_ids
from plainlm.model import forward, prefill

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWhat is 17 times 23?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis converts sunlight into",
    "1, 1, 2, 3, 5, 8, 13,",
]


def hf_logits(hf, ids):
    import torch
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer):
    return [hf_tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


def test_last_logits_match_transformers(ref_model, hf_model, prompt_ids):
    worst = 0.0
    for ids in prompt_ids:
        ours = prefill(ref_model, ids, ref_model.new_cache(64))
        ref = hf_logits(hf_model, ids)[-1]
        diff = np.abs(ours - ref).max()
        rng = ref.max() - ref.min()
        worst = max(worst, diff / rng)
        assert diff <= 1e-3 * rng, f"{ids[:8]}: max |diff| {diff} > 1e-3 x range {rng}"
    print(f"worst max|diff| / logit range = {worst:.2e}")


def test_all_positions_match_transformers(ref_model, hf_model, prompt_ids):
    ids = prompt_ids[3]
    ours = prefill(ref_model, ids, ref_model.new_cache(64), logits="all")
    ref = hf_logits(hf_model, ids)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-3 * (ref.max() - ref.min())


def test_greedy_continuations_identical(ref_model, hf_model, prompt_ids):
    import torch
    for ids in prompt_ids[:5]:
        ours = list(generate_ids(ref_model, ids, GenerationConfig(max_tokens=32, ignore_eos=True), eos_ids=(2,)))
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32,
                                    do_sample=False, num_beams=1)
        theirs = out[0, len(ids):].tolist()
        assert ours == theirs, f"prompt {ids[:6]}...: ours {ours} vs transformers {theirs}"


def test_cached_decode_equals_full_recomputation(ref_model, prompt_ids):
    """Logits of each decode step over the cache == a fresh forward over the whole prefix."""
    ids = prompt_ids[0]
    cache = ref_model.new_cache(64)
    logits = prefill(ref_model, ids, cache)
    seq = list(ids)
    for step in range(6):
        nxt = int(np.argmax(logits))
        seq.append(nxt)
        logits = forward(ref_model, [nxt], [len(seq) - 1], cache)
        full = prefill(ref_model, seq, ref_model.new_cache(64))
        np.testing.assert_allclose(logits, full, atol=2e-4, rtol=0)


def test_batched_slots_equal_single_sequences(ref_model, prompt_ids):
    """One forward over two sequences in two slots == each sequence alone."""
    a, b = prompt_ids[0], prompt_ids[4]
    cache = ref_model.new_cache(64, n_slots=2)
    la = prefill(ref_model, a, cache, slot=0)
    lb = prefill(ref_model, b, cache, slot=1)
    ta, tb = int(np.argmax(la)), int(np.argmax(lb))
    both = forward(ref_model, [ta, tb], [len(a), len(b)], cache, slot=[0, 1], logits="per_slot")
    for ids, t, row in ((a, ta, both[0]), (b, tb, both[1])):
        c = ref_model.new_cache(64)
        prefill(ref_model, ids, c)
        alone = forward(ref_model, [t], [len(ids)], c)
        np.testing.assert_allclose(row, alone, atol=2e-4, rtol=0)


@pytest.mark.parametrize("k", [0, 1])
def test_beam_search_matches_transformers(ref_model, hf_model, prompt_ids, k):
    import torch
    ids = prompt_ids[k]
    ours = beam_search(ref_model, ids, n_beams=3, max_tokens=10, eos_ids=(2,))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=10, num_beams=3, do_sample=False,
                                early_stopping=False, length_penalty=1.0, eos_token_id=2, pad_token_id=2)
    theirs = [t for t in out[0, len(ids):].tolist() if t != 2]
    assert ours == theirs
