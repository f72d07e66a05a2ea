import pytest

from dlmdistill.flops import ModelShape, PassCounter, cost_table, estimate_flops, format_cost_table
from tests.conftest import tiny_model


def test_formula_by_hand():
    shape = ModelShape(body_params=100, head_params=50, num_layers=2, hidden_size=4)
    # forward = 2*100*10 + 2*50*3 + 4*2*4*30 = 2000 + 300 + 960
    kw = dict(tokens=10, head_rows=3, sum_sq_lengths=30)
    assert estimate_flops(shape, kind="frozen", **kw) == 3260
    assert estimate_flops(shape, kind="lora", **kw) == 2 * 3260
    assert estimate_flops(shape, kind="train", **kw) == 3 * 3260


def test_reduces_to_six_n_tokens_without_attention_and_with_the_head_everywhere():
    shape = ModelShape(body_params=700, head_params=300, num_layers=1, hidden_size=1)
    assert estimate_flops(shape, tokens=8, head_rows=8, sum_sq_lengths=0) == 6 * 1000 * 8


def test_model_shape_of_a_llama(tokenizer):
    model, _ = tiny_model(tokenizer)
    cfg = model.config
    d, ff, v = cfg.hidden_size, cfg.intermediate_size, model.vocab_size
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    shape = ModelShape.of(model)
    assert shape.body_params == cfg.num_hidden_layers * per_layer + d  # + final norm
    assert shape.head_params == d * v and shape.num_layers == cfg.num_hidden_layers and shape.hidden_size == d


def test_cost_table_per_iteration_totals_and_ratio():
    shape = ModelShape(body_params=1000, head_params=100, num_layers=1, hidden_size=8)
    sft, sf = PassCounter(), PassCounter()
    for _ in range(3):
        sft.add(batch_size=4, seq_len=16, head_rows=32)
        sf.add(batch_size=8, seq_len=16, head_rows=48)  # two copies; the easy one masks half as much
    rows = {"sft": {"student_training": sft.flops_per_micro_batch(shape, "train")},
            "selffusion": {"student_training": sf.flops_per_micro_batch(shape, "train")}}
    table = cost_table(rows, iterations=10, micro_batches_per_iteration=2)
    per_it = table["rows"]["sft"]["per_iteration"]["total"]
    assert per_it == 2 * estimate_flops(shape, tokens=64, head_rows=32, sum_sq_lengths=64 * 16)
    assert table["rows"]["sft"]["run_total"]["total"] == 10 * per_it
    ratio = table["rows"]["selffusion"]["student_training_ratio_to_sft"]
    assert 1.9 < ratio < 2.0  # the body doubles, the head 1.5x
    assert "selffusion" in format_cost_table(table)
    assert PassCounter().flops_per_micro_batch(shape, "train") == 0.0


def test_unknown_kind_is_an_error():
    with pytest.raises(KeyError):
        estimate_flops(ModelShape(1, 1, 1, 1), tokens=1, head_rows=1, sum_sq_lengths=1, kind="bogus")
