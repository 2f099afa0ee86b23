"""The datastore of the model's own outputs: its n-gram table, persistence, and its drafts in the engine
(lossless greedy and sampling, batch == alone, accepted when the model repeats itself across prompts)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_decoding import THRESHOLD, ar, chi_square, exact_three_token_dist, prompts

from tidar.decode import Datastore, DatastoreError, Decoder, GenerationConfig, GenerationError, generate


def test_draft_follows_the_most_frequent_next_token_and_backs_off_to_shorter_ngrams():
    ds = Datastore([[1, 2, 3, 4, 5, 6], [9, 2, 3, 7, 8], [0, 2, 3, 7, 1]], vocab_size=10, orders=(3, 2))
    # (2, 3) is followed by 4 once and by 7 twice: the draft continues after the first "2 3 7"
    assert ds.draft([5, 2, 3], 3) == [7, 8]  # stops at the end of its sequence, not in the next one
    assert ds.draft([5, 2, 3], 1) == [7]
    # the longer n-gram (1, 2, 3) wins over (2, 3)'s majority
    assert ds.draft([1, 2, 3], 8) == [4, 5, 6]
    assert ds.draft([4, 4], 4) == []  # unknown n-gram
    assert ds.draft([3], 4) == []  # shorter than every order
    assert ds.draft([1, 2, 3], 0) == []
    assert len(ds) == 16


def test_ties_go_to_the_smaller_token_then_the_earliest_occurrence():
    ds = Datastore([[5, 6, 9], [5, 6, 8, 1], [5, 6, 8, 2]], vocab_size=10, orders=(2,))
    assert ds.draft([5, 6], 3) == [8, 1]  # 8 twice beats 9 once; of the two "5 6 8", the first


def test_long_ngrams_of_a_large_vocabulary_are_hashed_consistently():
    """Keys past int64 (order 6 of a 49K vocabulary) wrap; the Python-side key must wrap the same way."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 49152, (40,), generator=g).tolist() for _ in range(30)]
    ds = Datastore(seqs, vocab_size=49152, orders=(6,))
    for s in seqs:
        assert ds.draft(s[:10], 5) == s[10:15]
    assert ds.draft([1, 2, 3, 4, 5, 6], 5) == []


def test_a_draft_is_the_copy_after_the_first_occurrence_cut_at_its_sequence_end():
    ds = Datastore([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7], [0, 3, 4, 8]], vocab_size=10, orders=(2,))
    assert ds.draft([1, 2], 8) == [3, 4, 5]
    assert ds.draft([1, 2], 2) == [3, 4]


def test_several_branches_come_from_the_successors_in_order_of_frequency():
    ds = Datastore([[1, 2, 3, 4], [1, 2, 3, 5], [0, 2, 3, 6, 7], [9, 3, 8]], vocab_size=10, orders=(3, 2))
    assert ds.successors([1, 2, 3], 5) == [(4, 0.5), (5, 0.5)]  # order 3: (1 2 3) -> 4 or 5
    assert [t for t, _ in ds.successors([7, 2, 3], 5)] == [4, 5, 6]  # order 2: (2 3) -> 4, 5, 6
    assert ds.successors([7, 7], 5) == []
    # distinct first tokens, the longest n-gram's successors first, then the shorter n-gram's
    assert ds.drafts([1, 2, 3], 3, 2) == [[4], [5]]
    assert ds.drafts([1, 2, 3], 3, 5) == [[4], [5], [6, 7]]
    assert ds.drafts([7, 2, 3], 2, 2) == [[4], [5]]
    assert ds.drafts([4, 2, 3], 3, 9) == [[4], [5], [6, 7]]


def test_learned_outputs_are_drafted_first_and_stay_in_their_fork(tmp_path):
    ds = Datastore([[1, 2, 3, 4, 5]], vocab_size=10, orders=(3, 2))
    assert ds.draft([0, 2, 3], 2) == [4, 5]
    learner = ds.fork()
    learner.learn([7, 2, 3, 9, 8])
    learner.learn([6, 2, 3, 9, 1])
    # the learned (2 3) -> 9 beats the tables' (2 3) -> 4, even against their longer n-gram
    assert learner.draft([1, 2, 3], 3) == [9, 8]
    assert learner.draft([5, 5], 3) == []
    assert ds.draft([1, 2, 3], 3) == [4, 5] and ds.learned_tokens == 0  # the original never learned
    assert (learner.learned_sequences, learner.learned_tokens) == (2, 10)
    learner.save(tmp_path)  # what it learned is saved with the tables
    assert Datastore.load(tmp_path).draft([0, 2, 3], 2) == [9, 8]
    assert len(Datastore.load(tmp_path)) == 15
    learner.reset_learned()
    assert learner.draft([1, 2, 3], 3) == [4, 5]
    with pytest.raises(DatastoreError, match="token ids must lie in"):
        learner.learn([1, 10])


def test_learning_is_bounded(monkeypatch):
    import tidar.decode.drafters.datastore as dsm

    monkeypatch.setattr(dsm, "LEARN_LIMIT", 8)
    ds = Datastore([[1, 2]], vocab_size=10, orders=(2,))
    ds.learn([1, 2, 3, 4, 5])
    ds.learn([6, 7, 8])
    assert ds.learned_tokens == 8 and ds.draft([1, 2], 2) == [3, 4]
    ds.learn([9, 9])  # past the limit: the learned part starts again
    assert (ds.learned_sequences, ds.learned_tokens) == (1, 2) and ds.draft([1, 2], 2) == []


def test_save_load_round_trip(tmp_path):
    seqs = [torch.randint(0, 50, (int(n),)).tolist() for n in torch.randint(0, 30, (20,))]
    ds = Datastore(seqs, vocab_size=50, meta={"sources": ["x"]})
    ds.save(tmp_path)
    back = Datastore.load(tmp_path)
    assert back.tokens.tolist() == ds.tokens.tolist() and back.orders == ds.orders
    assert back.meta == {"sources": ["x"]} and back.sequences == 20
    for s in seqs:
        for k in range(1, len(s)):
            assert back.draft(s[:k], 5) == ds.draft(s[:k], 5)


def test_bad_input_gets_a_clear_error(tmp_path):
    with pytest.raises(DatastoreError, match="token ids must lie in"):
        Datastore([[1, 2, 99]], vocab_size=10)
    with pytest.raises(DatastoreError, match="tidar datastore build"):
        Datastore.load(tmp_path)
    with pytest.raises(DatastoreError, match="orders must be positive"):
        Datastore([[1]], vocab_size=10, orders=(0,))
    with pytest.raises(GenerationError, match="needs a datastore"):
        Decoder(tiny_model(), GenerationConfig(datastore_tokens=8))
    with pytest.raises(GenerationError, match="datastore_tokens must be >= 0"):
        GenerationConfig(datastore_tokens=-1).validate()


def test_datastore_drafts_are_lossless_and_accepted_when_the_model_repeats_itself():
    """A datastore of the model's own greedy continuations: decoding text it wrote before must accept
    its drafts (several times the tokens per forward of the untrained diffusion block alone), and
    the output is still AR's, alone and in a ragged batch with prompt lookup on too."""
    model = tiny_model(seed=3)
    seen = prompts(8, seed=5)
    ds = Datastore(ar(model, seen, 60), vocab_size=model.config.vocab_size)
    # the same prompts again: the model writes what the datastore holds (its 60-token answers,
    # without the prompts, so the first draft comes once two tokens are written)
    fresh = seen
    expected = [ar(model, [p], 40)[0] for p in fresh]
    cfg = dict(max_new_tokens=40, block_size=3)
    plain = [generate(model, [p], GenerationConfig(**cfg)) for p in fresh]
    with_ds = [generate(model, [p], GenerationConfig(**cfg, datastore_tokens=8), datastore=ds) for p in fresh]
    assert [o.sequences[0] for o in plain] == [o.sequences[0] for o in with_ds] == expected
    tpf = sum(o.stats.tokens_per_forward for o in with_ds) / len(fresh)
    assert tpf > 3 * sum(o.stats.tokens_per_forward for o in plain) / len(fresh)
    assert sum(o.stats.accepted_drafts["datastore"] for o in with_ds) > 20 * len(fresh)
    assert any(sum(o.stats.acceptance_histogram[3:]) for o in with_ds)  # spans past the block
    model.datastore = ds  # a model that carries its datastore (as `Runtime.load` attaches it) needs no argument
    again = generate(model, [fresh[0]], GenerationConfig(**cfg, datastore_tokens=8))
    assert again.sequences[0] == expected[0] and again.stats.accepted_drafts == with_ds[0].stats.accepted_drafts
    del model.datastore
    both = GenerationConfig(**cfg, datastore_tokens=8, lookup_ngram=2, lookup_tokens=6)
    batch = generate(model, fresh + prompts(3, seed=9), both, datastore=ds).sequences
    assert batch == expected + [ar(model, [p], 40)[0] for p in prompts(3, seed=9)]


def test_datastore_drafts_with_sampling_keep_the_distribution():
    """Sampled tokens under datastore drafts (one-hot proposals) are distributed as AR sampling's:
    the datastore holds continuations of every 2-gram here, so every step's draft comes from it."""
    model = tiny_model(seed=4, vocab_size=4)
    model.init_weights(std=0.12, seed=4)
    prompt = [0, 3, 1]
    ds = Datastore([[a, b, c, d] for a in range(4) for b in range(4) for c in range(4) for d in range(4)],
                   vocab_size=4, orders=(2,))
    exact = exact_three_token_dist(model, prompt)
    out = generate(model, [prompt] * 4000, GenerationConfig(
        do_sample=True, max_new_tokens=3, seed=5, block_size=3, datastore_tokens=4), datastore=ds)
    counts = torch.zeros(4, 4, 4)
    for s in out.sequences:
        counts[s[0], s[1], s[2]] += 1
    stat, _ = chi_square(counts, exact)
    assert stat < THRESHOLD
    assert sum(out.stats.acceptance_histogram[1:]) > 0


def test_cli_builds_into_a_model_directory_and_records_it(tmp_path, capsys):
    import json

    from tidar.cli import main
    from tidar.model.weights import save_pretrained

    model_dir = tmp_path / "model"
    save_pretrained(tiny_model(), model_dir)
    gen = tmp_path / "gen"
    gen.mkdir()
    rows = [{"prompt": [1, 2], "completion": [5, 6, 7, 8], "src": "test prompts"}, {"prompt": [3], "completion": [6, 7, 9]}]
    (gen / "generated.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(model_dir)]) == 0
    ds = Datastore.load(model_dir)
    assert len(ds) == 7 and ds.vocab_size == 97 and ds.meta["sources"][0]["prompts"] == "test prompts"
    assert ds.draft([4, 5, 6], 3) == [7, 8]
    assert main(["datastore", "info", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 7
    # bad input: one line, exit code 2, nothing written
    assert main(["datastore", "build", "--generated", str(tmp_path / "nope"), "--out", str(model_dir)]) == 2
    assert "generated.jsonl not found" in capsys.readouterr().err
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(tmp_path / "nope")]) == 2
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(model_dir),
                 "--datastore-tokens", "4"]) == 2  # no manifest to record it in
    assert "tidar.json" in capsys.readouterr().err
    assert main(["datastore", "info", str(tmp_path)]) == 2
    # --orders: which n-gram lengths are indexed (a 1-gram key finds what the 2-gram table cannot)
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(model_dir), "--orders", "1"]) == 0
    assert Datastore.load(model_dir).orders == (1,) and Datastore.load(model_dir).draft([0, 6], 2) == [7, 8]
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(model_dir), "--orders", "x"]) == 2
    # --datastore-tokens: recorded as the model's operating point when it has a manifest
    (model_dir / "tidar.json").write_text("{}")
    assert main(["datastore", "build", "--generated", str(gen), "--out", str(model_dir), "--datastore-tokens", "3"]) == 0
    assert json.loads((model_dir / "tidar.json").read_text())["operating_point"] == {"datastore_tokens": 3}
