"""Batched generation on the golden IXC-2.5 tiny model: every row of a batch generates the tokens it generates
alone (mixed prompt lengths, with and without images, greedy and sampled), rows joining a running batch and
leaving it early, and one compiled decode graph for every batch size (GRAPH mode). Both MindSpore modes.
"""
import mindspore as ms
import numpy as np
import pytest

from conftest import MODES, mindspore_mode
from helpers_chat import SMALL, WIDE
from ms_xcomposer import load
from ms_xcomposer.batching import DecodeBatch, Row, batch_key
from ms_xcomposer.conversation import batch_chat, batch_chat_with_ids, chat_with_ids, prepare_turn

# Prompt lengths differ by up to ~600 rows (two HD images vs a short text); the second query's history makes a
# text-only prompt longer than the first image prompt.
QUERIES = ["Describe this image.", "Hi",
           "Image1 <ImageHere>; Image2 <ImageHere>; What differs between the two pictures?", "Count to ten."]
IMAGES = [[WIDE], None, [SMALL, WIDE], None]
HISTORIES = [(), [("Who are you?", "A small test model that says little of use.")], (), ()]
OPTIONS = dict(max_new_tokens=10, hd_num=1)


@pytest.fixture(scope="module", params=sorted(MODES))
def mode_model(request, converted):
    """(mode, model, processor), one load per mode; the mode stays set while the module's tests of it run."""
    with mindspore_mode(request.param):
        model, processor = load(converted)
        yield request.param, model, processor


@pytest.fixture(scope="module")
def alone(mode_model):
    """Each query run alone with `chat_with_ids` (greedy): the ids every batched row must reproduce."""
    _, model, processor = mode_model
    return [chat_with_ids(model, processor, q, images=i, history=h, **OPTIONS).ids
            for q, i, h in zip(QUERIES, IMAGES, HISTORIES)]


def test_batch_rows_equal_alone(mode_model, alone):
    _, model, processor = mode_model
    results = batch_chat_with_ids(model, processor, QUERIES, images=IMAGES, histories=HISTORIES, **OPTIONS)
    assert [r.ids for r in results] == alone
    assert all(len(ids) >= 2 for ids in alone)  # more than the prefill's token: decode steps were compared too
    pairs = batch_chat(model, processor, QUERIES[1:3], images=IMAGES[1:3], histories=HISTORIES[1:3], **OPTIONS)
    assert [h for _, h in pairs] == [list(HISTORIES[1]) + [(QUERIES[1], pairs[0][0])], [(QUERIES[2], pairs[1][0])]]
    assert [r for r, _ in pairs] == [r.response for r in results[1:3]]


def test_batch_sampling_rows_equal_alone(mode_model):
    """Sampling: each row draws from its own generator seeded by `seed`, as the same query alone does."""
    _, model, processor = mode_model
    options = dict(OPTIONS, do_sample=True, temperature=1.5, top_k=0, seed=7)
    results = batch_chat_with_ids(model, processor, QUERIES[:3], images=IMAGES[:3], **options)
    single = [chat_with_ids(model, processor, q, images=i, **options).ids for q, i in zip(QUERIES[:3], IMAGES[:3])]
    assert [r.ids for r in results] == single


def test_rows_join_and_leave_a_running_batch(mode_model, alone):
    """Continuous batching's core: rows join between decode steps, one is cancelled, the rest finish with the
    tokens they have alone; the cancelled row's cache row is dropped."""
    _, model, processor = mode_model
    turns = [prepare_turn(model, processor, q, i, h, **OPTIONS) for q, i, h in zip(QUERIES, IMAGES, HISTORIES)]
    rows = [Row(t.inputs, t.generation) for t in turns]
    extra = Row(turns[1].inputs, turns[1].generation)  # the same prompt again, cancelled after 2 steps
    batch = DecodeBatch(model, batch_key(model, turns[0].inputs.extras))
    finished = batch.join([rows[0]])
    for _ in range(2):
        finished += batch.step()
    finished += batch.join([rows[1], extra])
    finished += batch.step()
    assert extra in batch.rows and batch.cache.batch == len(batch)
    extra.cancel()
    finished += batch.join(rows[2:])
    assert extra.finish_reason == "cancelled" and extra not in batch.rows and batch.cache.batch == len(batch)
    assert len(extra.generated) == 2
    while len(batch):
        finished += batch.step()
    assert sorted(map(id, finished)) == sorted(map(id, rows + [extra]))
    assert [r.generated for r in rows] == alone
    assert [r.finish_reason for r in rows] == ["stop" if ids[-1] in turns[0].generation.eos_token_id else "length"
                                              for ids in alone]


def test_chunked_prefill_between_decode_steps(mode_model, alone):
    """A join prefilled chunk by chunk (`begin_join` / `Prefill.advance` / `end_join`), a decode step of the
    running rows after every chunk, gives every row its tokens alone: an image prompt and a short text prompt in
    one prefill (the first chunk spans the padding), then the longest prompt alone in small chunks."""
    _, model, processor = mode_model
    turns = [prepare_turn(model, processor, q, i, h, **OPTIONS) for q, i, h in zip(QUERIES, IMAGES, HISTORIES)]
    rows = [Row(t.inputs, t.generation) for t in turns]
    batch = DecodeBatch(model, batch_key(model, turns[0].inputs.extras))
    batch.join([rows[1]])
    steps_before = len(rows[1].generated)
    for joining, chunk in (([rows[0], rows[3]], 8), ([rows[2]], 64)):
        prefill = batch.begin_join(joining, chunk)
        chunks = 0
        while not prefill.done:
            prefill.advance()
            batch.step()
            chunks += 1
        assert chunks >= 3, prefill.bounds
        batch.end_join(prefill)
    assert len(rows[1].generated) > steps_before + 3  # the running row decoded between the chunks
    while len(batch):
        batch.step()
    assert [r.generated for r in rows] == alone


def test_one_decode_graph_for_every_batch_size(converted):
    """GRAPH mode: batches of 4, 2 and 1 rows of other lengths, and rows joining mid-decode, compile nothing
    after the first batch (per compiled piece, from MindSpore's own compile cache): one PLoRA prefill graph,
    one graph for text-only prefills and every decode step, the embedding, one vision graph per tile grid."""
    previous = ms.get_context("mode")  # the module's other tests may be running in either mode
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        model, processor = load(converted)
        batch_chat(model, processor, QUERIES, images=IMAGES, **OPTIONS)
        counts = {key: len(piece.compile_cache) for key, piece in model._pieces.items()}
        llm = {key: n for key, n in counts.items() if key[0] == "llm"}
        assert sorted(llm.values()) == [1, 1] and len(llm) == 2, counts
        batch_chat(model, processor, QUERIES[1:3], images=IMAGES[1:3], **OPTIONS)
        batch_chat(model, processor, ["A different, longer question about nothing at all?"], **OPTIONS)
        batch_chat(model, processor, QUERIES[::-1], images=IMAGES[::-1], **dict(OPTIONS, max_new_tokens=4))
        turns = [prepare_turn(model, processor, q, i, h, **OPTIONS) for q, i, h in zip(QUERIES, IMAGES, HISTORIES)]
        batch = DecodeBatch(model, batch_key(model, turns[0].inputs.extras))
        batch.join([Row(turns[1].inputs, turns[1].generation)])
        prefill = batch.begin_join([Row(t.inputs, t.generation) for t in turns[2:]], chunk=32)  # chunked
        while not prefill.done:
            prefill.advance()
            batch.step()
        batch.end_join(prefill)
        assert {key: len(piece.compile_cache) for key, piece in model._pieces.items()} == counts
    finally:
        ms.set_context(mode=previous)


def test_batch_errors(mode_model):
    _, model, processor = mode_model
    with pytest.raises(ValueError, match="2 queries but 1 images"):
        batch_chat(model, processor, QUERIES[:2], images=[None])
    with pytest.raises(ValueError, match="placeholder"):  # checked before anything is generated
        batch_chat(model, processor, ["fine", "two images, no marks"], images=[None, [SMALL, WIDE]])
    turn = prepare_turn(model, processor, "Hi", None, (), num_beams=2)
    with pytest.raises(ValueError, match="beam search"):
        Row(turn.inputs, turn.generation)
    with pytest.raises(ValueError, match="positions must be integers of shape"):
        model(input_ids=np.zeros((2, 3), np.int32), positions=np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"rows \[1\] have none"):
        model(input_ids=np.zeros((2, 3), np.int32), positions=np.array([[0, 1, 2], [-1, -1, -1]]))


def test_batch_with_beams_runs_them_alone(mode_model, alone):
    """num_beams > 1 is not batched: batch_chat runs such rows one after the other, as `chat` does."""
    _, model, processor = mode_model
    beams = dict(OPTIONS, num_beams=2)
    results = batch_chat_with_ids(model, processor, QUERIES[:2], images=IMAGES[:2], histories=HISTORIES[:2], **beams)
    single = [chat_with_ids(model, processor, q, images=i, history=h, **beams).ids
              for q, i, h in zip(QUERIES[:2], IMAGES[:2], HISTORIES[:2])]
    assert [r.ids for r in results] == single
