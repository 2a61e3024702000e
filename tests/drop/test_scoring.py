"""Scoring pass and drop selection: against transformers (hooks) on tiny random models, on hand-built layers whose
answers are known, and on bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import hf_model
from torch import nn

from llmdrop_rt.config import DropPlan, ModelConfig
from llmdrop_rt.drop.calibration import CalibrationError, build_calibration, load_calibration, read_texts
from llmdrop_rt.drop.metrics import ScoreTable, loss_pass, score_pass, scores_to_dict, table_from_dict
from llmdrop_rt.drop.selection import candidate_modules, plan_drops, select
from llmdrop_rt.drop.sources import InMemorySource, LayerSource, ScoringError, StreamingSource
from llmdrop_rt.io.tokenizer import Tokenizer
from llmdrop_rt.model.layers import DecoderLayer


def random_calibration(folder, n_samples, seq_len, seed, padded_tail=0):
    """Random token ids (any id is a valid input); the last `padded_tail` tokens of sample 0 are padding."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, 300, (n_samples, seq_len), generator=gen)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    if padded_tail:
        valid[0, -padded_tail:] = False
        tokens[0, -padded_tail:] = 1  # pad id: must not count in any average
    from llmdrop_rt.drop.calibration import CalibrationSet, CalibrationSettings

    return CalibrationSet(tokens, valid, CalibrationSettings("random", n_samples, seq_len, seed))


def reference_scores(folder, calib, drop_attn=(), drop_mlp=()):
    """Every metric from transformers' own modules, captured with forward hooks (float64 averages). A unit's output
    is its last module's (Gemma2: the post-norm after the attention / MLP)."""
    model = hf_model(folder, drop_attn, drop_mlp)
    family = ModelConfig.from_folder(folder).family
    layers = model.model.layers
    captured = {}

    def keep(name, index):
        def hook(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            captured[(name, index)] = (inputs.detach(), out.detach())
        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_hook(keep("layer", i), with_kwargs=True)
        getattr(layer, family.attn_post_norm or "self_attn").register_forward_hook(keep("attn", i), with_kwargs=True)
        getattr(layer, family.mlp_post_norm or "mlp").register_forward_hook(keep("mlp", i), with_kwargs=True)
        getattr(layer, family.attn_norm).register_forward_hook(keep("attn_norm", i), with_kwargs=True)
        getattr(layer, family.mlp_norm).register_forward_hook(keep("mlp_norm", i), with_kwargs=True)
    weights = calib.valid.double()
    last = calib.valid.long().cumsum(1).argmax(1)
    L = len(layers)
    sums = {key: [0.0] * L for key in ("attn", "mlp", "block", "attn_nores", "mlp_nores", "attn_ang", "mlp_ang")}
    layer_inputs = [[] for _ in range(L + 1)]

    def cos(a, b):
        return F.cosine_similarity(a.float(), b.float(), dim=-1).double()

    def angle(a, b):
        return (torch.arccos(cos(a[rows_b, last_b], b[rows_b, last_b]).clamp(-1, 1)) / math.pi).sum().item()

    for b in range(calib.n_samples):  # one sample at a time: a different batching than the runtime's
        rows_b, last_b = torch.tensor([0]), last[b: b + 1]
        with torch.no_grad():
            model(calib.tokens[b: b + 1], attention_mask=calib.valid[b: b + 1].long())
        w = weights[b: b + 1]
        for i in range(L):
            x, out = captured[("layer", i)]
            attn_out = captured[("attn", i)][1]
            mlp_out = captured[("mlp", i)][1]
            mid = x + attn_out
            layer_inputs[i].append(x[0, last_b[0]])
            sums["attn"][i] += (cos(x, mid) * w).sum().item()
            sums["mlp"][i] += (cos(mid, out) * w).sum().item()
            sums["block"][i] += (cos(x, out) * w).sum().item()
            sums["attn_nores"][i] += (cos(captured[("attn_norm", i)][1], attn_out) * w).sum().item()
            sums["mlp_nores"][i] += (cos(captured[("mlp_norm", i)][1], mlp_out) * w).sum().item()
            sums["attn_ang"][i] += angle(x, mid)
            sums["mlp_ang"][i] += angle(mid, out)
            if i == L - 1:
                layer_inputs[L].append(out[0, last_b[0]])
    total = weights.sum().item()
    n = calib.n_samples
    inputs = torch.stack([torch.stack(v) for v in layer_inputs])  # [L+1, N, D]: never the final-normed state
    windows = {width: (torch.arccos(cos(inputs[:-width], inputs[width:]).clamp(-1, 1)) / math.pi).mean(1).tolist()
               for width in range(1, L + 1)}
    return {
        "cosine": {k: [1 - v / total for v in sums[k]] for k in ("attn", "mlp", "block")},
        "cosine_no_residual": {k: [1 - v / total for v in sums[f"{k}_nores"]] for k in ("attn", "mlp")},
        "angular": {"attn": [v / n for v in sums["attn_ang"]], "mlp": [v / n for v in sums["mlp_ang"]]},
        "windows": windows,
    }


def assert_close_lists(ours, ref, dropped=(), tol=1e-5):
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        if i in dropped:
            assert a is None, f"layer {i} is dropped but got a score"
        else:
            assert a is not None and abs(a - b) < tol, f"layer {i}: ours {a} vs transformers {b}"


@pytest.mark.parametrize("name,drop_attn,drop_mlp", [("llama2", (), ()), ("llama3", (1,), (3,)),
                                                      ("mistral", (), (2,)), ("sharded", (0,), ()),
                                                      ("gemma2", (1,), (3,)), ("qwen3", (2,), ()),
                                                      ("qwen2_sliding", (), (1,))])
def test_scores_equal_transformers_hooks(tiny_checkpoints, family_checkpoints, name, drop_attn, drop_mlp):
    folder = {**tiny_checkpoints, **family_checkpoints}[name]
    # seq_len 11 > Mistral's sliding window of 7; a padded tail in sample 0 must not count.
    calib = random_calibration(folder, n_samples=5, seq_len=11, seed=hash(name) % 1000, padded_tail=3)
    plan = DropPlan.create(ModelConfig.from_folder(folder).num_layers, drop_attn, drop_mlp)
    ours = score_pass(StreamingSource(folder), calib, plan, batch_size=2, progress=False)
    ref = reference_scores(folder, calib, drop_attn, drop_mlp)
    for kind in ("attn", "mlp", "block"):
        dropped = {"attn": drop_attn, "mlp": drop_mlp, "block": ()}[kind]
        assert_close_lists(ours.importance["cosine"][kind], ref["cosine"][kind], dropped)
        assert ours.importance["bi"][kind] == ours.importance["cosine"][kind]
    for kind in ("attn", "mlp"):
        dropped = drop_attn if kind == "attn" else drop_mlp
        assert_close_lists(ours.importance["cosine_no_residual"][kind], ref["cosine_no_residual"][kind], dropped)
        assert_close_lists(ours.importance["angular"][kind], ref["angular"][kind], dropped)
    for width, distances in ref["windows"].items():
        assert_close_lists(ours.angular_windows[width], distances)
    assert ours.tokens == 5 * 11 - 3


def test_streaming_and_in_memory_give_identical_scores(tiny_checkpoints):
    folder = tiny_checkpoints["llama3"]
    calib = random_calibration(folder, 6, 16, seed=7)
    plan = DropPlan.create(6, [2], [])
    streamed = score_pass(StreamingSource(folder), calib, plan, batch_size=4, progress=False)
    resident = score_pass(InMemorySource.from_folder(folder), calib, plan, batch_size=4, progress=False)
    assert streamed.importance == resident.importance
    assert streamed.angular_windows == resident.angular_windows


def test_streaming_reads_only_kept_weights_of_one_layer_at_a_time(tiny_checkpoints):
    folder = tiny_checkpoints["llama2"]
    source = StreamingSource(folder)
    plan = DropPlan.create(4, [1], [1, 2])
    layer = source.layer(1, plan)
    assert layer.attn is None and layer.mlp is None
    assert source.bytes_read == 0  # a fully dropped layer reads nothing
    layer = source.layer(2, plan)
    assert layer.attn is not None and layer.mlp is None
    attention_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert source.bytes_read == attention_bytes  # exactly the kept attention (and its norm) of layer 2


@pytest.mark.parametrize("name", ["llama2", "gemma2"])  # gemma2: embedding scale and final soft-capping
def test_loss_pass_equals_transformers_with_module_removed(tiny_checkpoints, family_checkpoints, name):
    folder = {**tiny_checkpoints, **family_checkpoints}[name]
    calib = random_calibration(folder, 3, 9, seed=3)
    plan = DropPlan.create(4, [], [0])
    candidates = candidate_modules(plan, "joint") + [("block", 2)]
    base, losses = loss_pass(StreamingSource(folder), calib, plan, candidates, batch_size=2, progress=False)

    def hf_loss(drop_attn, drop_mlp):
        model = hf_model(folder, drop_attn, drop_mlp)
        with torch.no_grad():
            logits = model(calib.tokens).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), calib.tokens[:, 1:].flatten()).item()

    assert abs(base - hf_loss([], [0])) < 1e-5
    for kind, i in candidates:
        drop_attn = [i] if kind in ("attn", "block") else []
        drop_mlp = sorted({0} | ({i} if kind in ("mlp", "block") else set()))
        assert abs(losses[(kind, i)] - hf_loss(drop_attn, drop_mlp)) < 1e-5, (kind, i)
    assert ("mlp", 0) not in losses  # already dropped: not a candidate


# ---- hand-built layers with known answers --------------------------------------------------------------------

HIDDEN = 6


def tiny_config(num_layers: int) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8, "hidden_size": HIDDEN,
                                  "intermediate_size": 4, "num_hidden_layers": num_layers,
                                  "num_attention_heads": 1, "max_position_embeddings": 64})


class SubBlock(nn.Module):
    """A hand-built sub-block. As an MLP it takes the normalised stream, through the runtime MLP's input step."""

    def prepare(self, x, pending, norm):
        return norm(x)


class AddConstant(SubBlock):
    """A sub-block that adds a fixed vector to every token (its input ignored)."""

    def __init__(self, vector):
        super().__init__()
        self.vector = torch.as_tensor(vector, dtype=torch.float32)

    def forward(self, x, ctx=None):
        return self.vector.expand_as(x)


class Gate(SubBlock):
    """Adds `gain * x[axis_in]` along `axis_out`: large when its input carries the `axis_in` component."""

    def __init__(self, axis_in, axis_out, gain):
        super().__init__()
        self.axis_in, self.axis_out, self.gain = axis_in, axis_out, gain

    def forward(self, x, ctx=None):
        out = torch.zeros_like(x)
        out[..., self.axis_out] = self.gain * x[..., self.axis_in]
        return out


class AddRelative(SubBlock):
    """Adds `ratio * |x|` along `axis` (orthogonal to x when x has no `axis` component): cos = 1/sqrt(1+ratio^2)."""

    def __init__(self, axis, ratio):
        super().__init__()
        self.axis, self.ratio = axis, ratio

    def forward(self, x, ctx=None):
        out = torch.zeros_like(x)
        out[..., self.axis] = self.ratio * x.norm(dim=-1)
        return out


class HandBuiltSource(LayerSource):
    """Layers made of AddConstant / Gate modules; identity norms; every token embeds to e0."""

    def __init__(self, attn_modules, mlp_modules):
        self.cfg = tiny_config(len(mlp_modules))
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.attn_modules, self.mlp_modules = attn_modules, mlp_modules

    def embed(self, tokens):
        out = torch.zeros(*tokens.shape, HIDDEN)
        out[..., 0] = 1.0
        return out

    def layer(self, index, plan):
        attn = self.attn_modules[index] if plan.has_attn(index) else None
        mlp = self.mlp_modules[index] if plan.has_mlp(index) else None
        return DecoderLayer(index, nn.Identity() if attn else None, attn, nn.Identity() if mlp else None, mlp)


def unit(axis, scale=1.0):
    v = torch.zeros(HIDDEN)
    v[axis] = scale
    return v


def calib_for(source, n=2, t=4):
    from llmdrop_rt.drop.calibration import CalibrationSet, CalibrationSettings

    tokens = torch.zeros(n, t, dtype=torch.long)
    return CalibrationSet(tokens, torch.ones_like(tokens, dtype=torch.bool), CalibrationSettings("zeros", n, t, None))


def test_bi_ranking_and_angular_window_on_known_case():
    # Layers 2 and 3 add nothing (identities): lowest BI, and the 2-layer window starting at 2 has distance 0.
    # The other layers add vectors of decreasing size along fresh axes, so their BI order is known.
    sizes = [3.0, 1.0, 0.0, 0.0, 0.5, 2.0]
    axes = [1, 2, 3, 4, 5, 1]
    mlps = [AddConstant(unit(a, s)) for a, s in zip(axes, sizes)]
    source = HandBuiltSource([None] * 6, mlps)
    plan = DropPlan.create(6, list(range(6)), [])
    table = score_pass(source, calib_for(source), plan, progress=False)
    bi = table.importance["bi"]["block"]
    assert bi[2] == pytest.approx(0, abs=1e-7) and bi[3] == pytest.approx(0, abs=1e-7)
    # The residual stream is known exactly: BI and window distances follow from it by hand.
    stream = [unit(0)]
    for a, s in zip(axes, sizes):
        stream.append(stream[-1] + unit(a, s))
    cos = [F.cosine_similarity(stream[i], stream[i + 1], dim=0).item() for i in range(6)]
    assert bi == pytest.approx([1 - c for c in cos], abs=1e-6)
    expected_order = sorted(range(6), key=lambda i: (round(1 - cos[i], 6), i))
    assert [m[1] for m in select(table, "bi", "block", 6, plan)] == expected_order
    assert expected_order[:2] == [2, 3]
    assert select(table, "angular", "block", 2, plan) == [("block", 2), ("block", 3)]
    expected = math.acos(F.cosine_similarity(stream[1], stream[4], dim=0).item()) / math.pi
    assert table.angular_windows[3][1] == pytest.approx(expected, abs=1e-6)
    # n = 1 windows exist (the naive `[:-n+1]` slice would leave none).
    assert len(table.angular_windows[1]) == 6
    # Protection moves the window off the protected layers.
    assert select(table, "angular", "block", 2, plan, protect_first=3) == [("block", 3), ("block", 4)]


def test_joint_drop_merges_attention_and_mlp_rankings():
    table = ScoreTable(4, DropPlan.create(4), {"cosine": {
        "attn": [0.30, 0.05, 0.20, 0.01], "mlp": [0.50, 0.10, 0.04, 0.60], "block": [1, 1, 1, 1]}})
    assert select(table, "cosine", "joint", 4) == [("attn", 3), ("mlp", 2), ("attn", 1), ("mlp", 1)]
    assert select(table, "cosine", "attn", 2) == [("attn", 3), ("attn", 1)]
    assert select(table, "cosine", "mlp", 2) == [("mlp", 2), ("mlp", 1)]
    # Already-dropped modules are never re-selected, protected layers are skipped.
    plan = DropPlan.create(4, [3], [2])
    assert select(table, "cosine", "joint", 2, plan) == [("attn", 1), ("mlp", 1)]
    assert select(table, "cosine", "joint", 2, plan, protect_first=2) == [("attn", 2), ("mlp", 3)]


def test_iterative_rescoring_differs_from_one_shot_on_built_case():
    # MLP 0 adds a small e1; MLP 1 turns e1 into a large e2 (important only while MLP 0 exists); MLP 2 adds a
    # moderate e3. One-shot drops MLP 0 then MLP 2; iterative, after dropping MLP 0, sees MLP 1 become a no-op.
    mlps = [AddConstant(unit(1, 0.1)), Gate(1, 2, 100.0), AddRelative(3, 0.3)]
    source = HandBuiltSource([None] * 3, mlps)
    plan = DropPlan.create(3, [0, 1, 2], [])
    calib = calib_for(source)
    one_shot = plan_drops(source, calib, "cosine", "mlp", 2, "one-shot", plan, progress=False)
    iterative = plan_drops(source, calib, "cosine", "mlp", 2, "iterative", plan, progress=False)
    assert one_shot.order == [("mlp", 0), ("mlp", 2)]
    assert iterative.order == [("mlp", 0), ("mlp", 1)]
    assert len(iterative.tables) == 2 and iterative.tables[1].importance["cosine"]["mlp"][0] is None
    assert iterative.tables[1].importance["cosine"]["mlp"][1] == pytest.approx(0, abs=1e-7)
    assert sorted(iterative.plan.drop_mlp) == [0, 1]


def test_sleb_loss_iterative_picks_the_cheapest_removal_each_round(tiny_checkpoints):
    folder = tiny_checkpoints["llama3"]
    source = StreamingSource(folder)
    calib = random_calibration(folder, 2, 8, seed=11)
    result = plan_drops(source, calib, "loss", "block", 2, "iterative", protect_first=1, protect_last=1,
                        progress=False)
    for table, chosen in zip(result.tables, result.order):
        losses = {i: v for i, v in enumerate(table.importance["loss"]["block"]) if v is not None}
        assert set(losses) <= set(range(1, 5))  # first and last protected
        assert chosen == ("block", min(losses, key=losses.get))
    assert result.order[0] != result.order[1]


def test_scores_file_round_trip(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["llama2"]
    source = StreamingSource(folder)
    calib = load_calibration(Tokenizer(folder), write_text(tmp_path, 3000), n_samples=3, seq_len=20)
    table = score_pass(source, calib, progress=False)
    data = json.loads(json.dumps(scores_to_dict(table, source, calib)))
    assert data["calibration"]["n_samples"] == 3 and data["model"]["fingerprint"]
    assert set(data["importance"]) >= {"cosine", "bi", "angular"}
    again = table_from_dict(data)
    assert select(again, "cosine", "joint", 3) == select(table, "cosine", "joint", 3)


# ---- calibration data and bad input --------------------------------------------------------------------------


def write_text(folder, chars: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (chars // 5,), generator=gen))
    path = folder / "calib.txt"
    path.write_text(text)
    return path


def test_calibration_is_deterministic_and_joined_with_eos(tiny_checkpoints, tmp_path):
    tok = Tokenizer(tiny_checkpoints["llama2"])
    texts = ["first text " * 30, "second text " * 30, "third " * 40]
    a = build_calibration(tok, texts, n_samples=4, seq_len=50, seed=5)
    b = build_calibration(tok, texts, n_samples=4, seq_len=50, seed=5)
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (4, 50)
    in_order = build_calibration(tok, texts, n_samples=2, seq_len=50, seed=None)
    stream = []
    for t in texts:
        stream += tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
    assert in_order.tokens.flatten().tolist() == stream[:100]
    # .jsonl with a text field reads the same texts.
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)))
    assert read_texts(jsonl) == texts


def test_parquet_calibration(tiny_checkpoints, tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet support is optional (pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one two three", "four five"], "n": [1, 2]}), path)
    assert read_texts(path) == ["one two three", "four five"]
    with pytest.raises(CalibrationError, match="no column 'body'"):
        read_texts(path, text_field="body")


def test_bad_calibration_input_gives_clear_errors(tiny_checkpoints, tmp_path):
    tok = Tokenizer(tiny_checkpoints["llama2"])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ")
    with pytest.raises(CalibrationError, match="no non-empty text"):
        read_texts(empty)
    with pytest.raises(CalibrationError, match="file not found"):
        read_texts(tmp_path / "missing.txt")
    with pytest.raises(CalibrationError, match="give more text"):
        build_calibration(tok, ["short text"], n_samples=2, seq_len=64)
    for n, t, pattern in [(0, 16, "n_samples"), (-3, 16, "n_samples"), (2, 1, "seq_len"), (2, 300, "seq_len")]:
        with pytest.raises(CalibrationError, match=pattern):
            build_calibration(tok, ["x " * 1000], n_samples=n, seq_len=t, max_seq_len=256)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(CalibrationError, match=r"bad.jsonl:2: no string field 'text'"):
        read_texts(bad)
    csv = tmp_path / "x.csv"
    csv.write_text("text\nhello")
    with pytest.raises(CalibrationError, match="unsupported file type '.csv'"):
        read_texts(csv)


def test_dataset_name_without_datasets_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CalibrationError, match="needs the `datasets` package"):
        read_texts("allenai/c4")


def test_drop_count_larger_than_modules_left_is_a_clear_error(tiny_checkpoints):
    table = ScoreTable(4, DropPlan.create(4), {"cosine": {"attn": [0.1] * 4, "mlp": [0.2] * 4, "block": [0.3] * 4}})
    with pytest.raises(ScoringError, match="only 4 are left"):
        select(table, "cosine", "attn", 5)
    with pytest.raises(ScoringError, match="only 2 are left"):
        select(table, "cosine", "mlp", 3, DropPlan.create(4, [], [0, 1]))
    with pytest.raises(ScoringError, match="only 2 are left"):
        select(table, "cosine", "block", 3, protect_first=1, protect_last=1)
    with pytest.raises(ScoringError, match="positive integer"):
        select(table, "cosine", "attn", 0)
    with pytest.raises(ScoringError, match="not one of"):
        select(table, "cosine", "heads", 1)
    with pytest.raises(ScoringError, match="cosine metric only"):
        select(table, "bi", "attn", 1, residual=False)
    folder = tiny_checkpoints["llama2"]
    with pytest.raises(ScoringError, match="exceeds the model's context"):
        score_pass(StreamingSource(folder), random_calibration(folder, 1, 300, 0), progress=False)
