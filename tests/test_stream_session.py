"""The stream runtime below the network: state modes, prompt switching, batching, outbox, pacing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from stream.batching import commit, denoise, group_plans
from stream.state import StreamState, BlockOutput, BlockPlan, v2v_sigmas
from stream.protocol import FrameHeader, StartRequest, unpack_frame
from stream.session import OutFrame, Outbox, Pacer


def _block(state: StreamState, plan: BlockPlan, decode: bool = True) -> tuple[torch.Tensor, list[BlockOutput]]:
    """One block as the engine runs it: denoise, decode part by part, commit, end."""
    clean = denoise([plan], [[0]])[0]
    parts = list(state.decode(clean)) if decode else []
    commit([plan], [[0]], [clean])
    return clean, parts + [state.block_end()]


def _blocks(state: StreamState, count: int, decode: bool = True) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [_block(state, state.plan(), decode)[0] for _ in range(count)]


def test_prompt_switch_changes_the_next_block_only(tiny_pipeline):
    request = StartRequest("t2v", "a red circle moving right", seed=3)
    switched, same = StreamState(tiny_pipeline, request), StreamState(tiny_pipeline, request)
    before = _blocks(switched, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, _blocks(same, 2)))
    with torch.inference_mode():
        switched.switch_prompt("a blue square bouncing on gray", interpolate_blocks=0)
    after, unchanged = _blocks(switched, 1)[0], _blocks(same, 1)[0]
    assert (after - unchanged).abs().max() > 1e-3
    # The cross-attention cache follows the prompt (KVCache.sync_prompt).
    assert torch.equal(switched.rollout.cache.cross_text, tiny_pipeline.encode_prompt("a blue square bouncing on gray"))


def test_a_switch_recaches_the_kv_cache_by_default_and_on_request_only(tiny_pipeline):
    request = StartRequest("t2v", "a red circle moving right", seed=3)
    old, new = "a red circle moving right", "a blue square bouncing on gray"
    blocks, events = {}, {}
    for recache in (None, True, False):
        state = StreamState(tiny_pipeline, request)
        _blocks(state, 2)
        with torch.inference_mode():
            state.switch_prompt(new, interpolate_blocks=0, recache=recache)
            clean, parts = _block(state, state.plan())
        blocks[recache] = clean
        events[recache] = dict(e for part in parts for e in part.events)["prompt"]["recache"]
    assert tiny_pipeline.config.switch_recache and events == {None: True, True: True, False: False}  # the preset's
    assert torch.equal(blocks[None], blocks[True])
    assert (blocks[True] - blocks[False]).abs().max() > 1e-5  # the old K/V still count without it
    # The same stream made with the rollout alone: two blocks, a re-cache under the new prompt, a block.
    with torch.inference_mode():
        rollout = tiny_pipeline.new_rollout(3)
        for _ in range(2):
            rollout.next_block(tiny_pipeline.encode_prompt(old))
        rollout.recache(tiny_pipeline.encode_prompt(new))
        torch.testing.assert_close(rollout.next_block(tiny_pipeline.encode_prompt(new)), blocks[True])


def test_a_cut_starts_the_new_prompt_as_a_new_stream(tiny_pipeline):
    request = StartRequest("t2v", "a red circle moving right", seed=3)
    new = "a blue square bouncing on gray"
    state = StreamState(tiny_pipeline, request)
    with torch.inference_mode():
        _blocks(state, 2)
        state.switch_prompt(new, interpolate_blocks=2, cut=True)  # a cut does not interpolate
        plan = state.plan()
        assert state.rollout.cache.cached_frames == 0 and torch.equal(plan.text, tiny_pipeline.encode_prompt(new))
        clean, parts = _block(state, plan)
    event = dict(e for part in parts for e in part.events)["prompt"]
    assert event["cut"] is True and event["interpolate_blocks"] == 0
    k = tiny_pipeline.config.block_frames
    # The decoder starts again too: the cut's first latent frame is one video frame, as a stream's first.
    assert sum(len(part.jpegs) for part in parts) == 1 + 4 * (k - 1)
    # A new stream of the new prompt with the same noise makes the same block.
    with torch.inference_mode():
        fresh = tiny_pipeline.new_rollout(3)
        for _ in range(2):  # the noise the first two blocks drew
            for _ in range(len(fresh.sigmas)):
                fresh.noise(k)
        torch.testing.assert_close(fresh.next_block(tiny_pipeline.encode_prompt(new)), clean)
    assert state.rollout.cache.cached_frames == k and state.rollout.frames_done == k


def test_prompt_interpolation_blends_embeddings_over_blocks(tiny_pipeline):
    state = StreamState(tiny_pipeline, StartRequest("t2v", "a red circle", seed=0))
    old, new = state.text, tiny_pipeline.encode_prompt("a green triangle")
    with torch.inference_mode():
        state.switch_prompt("a green triangle", interpolate_blocks=2)
        texts = []
        for _ in range(4):
            plan = state.plan()
            texts.append(plan.text)
            _block(state, plan)
    for text, weight in zip(texts, (1 / 3, 2 / 3, 1.0, 1.0)):
        torch.testing.assert_close(text, torch.lerp(old, new, weight))
    assert state.idle_output().events == []  # the "prompt" event went out with the first block
    assert state.blocks == 4


def test_i2v_prefills_the_cache_and_decodes_the_image_first(tiny_pipeline):
    image = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)  # resized to 32x32
    state = StreamState(tiny_pipeline, StartRequest("i2v", "a red circle", image=image))
    assert state.rollout.cache.cached_frames == 1 and state.rollout.frames_done == 1
    with torch.inference_mode():
        _, parts = _block(state, state.plan())
    k = tiny_pipeline.config.block_frames
    assert [len(part.jpegs) for part in parts] == [1] + [4] * k + [0]  # the image's frame, then the block's
    assert parts[-1].block_end and parts[-1].cached_frames == 1 + k


def test_frames_are_sent_latent_frame_by_latent_frame_before_the_commit(tiny_pipeline):
    k = tiny_pipeline.config.block_frames
    first_block_frames = 1 + 4 * (k - 1)
    request = StartRequest("t2v", "a red circle", seed=0, max_frames=first_block_frames + 3)
    state = StreamState(tiny_pipeline, request)
    with torch.inference_mode():
        _, first = _block(state, state.plan())
        _, second = _block(state, state.plan())
    # A stream's first latent frame decodes to one pixel frame, every later one to four.
    assert [len(part.jpegs) for part in first] == [1] + [4] * (k - 1) + [0]
    assert [part.first_index for part in first[:-1]] == [0, 1, 5][:k]
    # Each part was made before its block entered the KV cache; the block's end comes after.
    assert {part.cached_frames for part in first[:-1]} == {0} and first[-1].cached_frames == k
    # max_frames ends the stream inside the second block's first latent frame: nothing past it is sent.
    assert [len(part.jpegs) for part in second] == [3, 0] and second[-1].done


@pytest.mark.parametrize("num_inputs", [13, 11])
def test_v2v_outputs_one_frame_per_input_frame(tiny_pipeline, num_inputs):
    state = StreamState(tiny_pipeline, StartRequest("v2v", "a red circle", strength=0.5))
    assert state.sigmas.tolist() == [0.5, 0.25]
    rng = np.random.default_rng(1)
    outputs, arrivals = [], [1000.0 + i for i in range(num_inputs)]
    with torch.inference_mode():
        for start in range(0, num_inputs, 3):  # input arrives in uneven chunks
            chunk = range(start, min(start + 3, num_inputs))
            state.feed([rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in chunk], [arrivals[i] for i in chunk])
            while (plan := state.plan()) is not None:
                outputs.extend(_block(state, plan)[1])
        assert not state.is_done()
        state.end_input()
        while (plan := state.plan()) is not None:
            outputs.extend(_block(state, plan)[1])
    origins = [t for out in outputs for t in out.t_origin]
    firsts = [out.first_index for out in outputs]
    assert sum(len(out.jpegs) for out in outputs) == num_inputs
    assert origins == arrivals  # output frame i carries input frame i's arrival time
    assert firsts == sorted(firsts) and state.is_done() and state.idle_output().done


def test_v2v_sigmas_follow_strength():
    student = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert v2v_sigmas(student, 0.8).tolist() == [0.75, 0.5, 0.25]
    assert v2v_sigmas(student, 1.0).tolist() == student.tolist()
    assert v2v_sigmas(student, 0.1).tolist() == pytest.approx([0.1])


def test_batched_blocks_equal_blocks_generated_alone(tiny_pipeline):
    """Stacked KV caches (through eviction of the rolling window) give each stream its own result."""
    prompts = ["a red circle moving right", "a blue square bouncing on gray"]
    alone = [StreamState(tiny_pipeline, StartRequest("t2v", p, seed=s)) for s, p in enumerate(prompts)]
    together = [StreamState(tiny_pipeline, StartRequest("t2v", p, seed=s)) for s, p in enumerate(prompts)]
    expected = [_blocks(g, 3, decode=False) for g in alone]
    with torch.inference_mode():
        for block in range(3):
            plans = [g.plan() for g in together]
            groups = group_plans(plans)
            assert groups == [[0, 1]]
            clean = denoise(plans, groups)
            commit(plans, groups, clean)
            for i, latents in enumerate(clean):
                torch.testing.assert_close(latents, expected[i][block], atol=1e-4, rtol=1e-4)
    for a, b in zip(alone, together):
        assert b.rollout.cache.cached_frames == a.rollout.cache.cached_frames == 5  # 6 frames, sink 1 + window 4
        assert b.rollout.frames_done == a.rollout.frames_done == 6


def test_plans_with_different_cache_lengths_are_not_batched(tiny_pipeline):
    t2v = StreamState(tiny_pipeline, StartRequest("t2v", "a red circle"))
    i2v = StreamState(tiny_pipeline, StartRequest("i2v", "a red circle", image=np.zeros((32, 32, 3), np.uint8)))
    with torch.inference_mode():
        plans = [t2v.plan(), i2v.plan()]
    assert group_plans(plans) == [[0], [1]]
    assert group_plans(plans, batching=False) == [[0], [1]]


def _frame(index: int, send_at: float = 0.0) -> OutFrame:
    return OutFrame(send_at, FrameHeader(index, 0, 0, 0.0, 0.0), b"jpeg")


def test_outbox_drops_oldest_frames_and_keeps_stream_order():
    async def scenario():
        outbox = Outbox(max_frames=4, max_events=2)
        for i in range(10):
            outbox.put_frame(_frame(i))
        outbox.put_event('"done"', in_stream=True)
        for i in range(3):
            outbox.put_event(f'"reply {i}"')
        assert (outbox.dropped, outbox.queued_frames, len(outbox.replies)) == (6, 4, 2)
        return [await outbox.next_message() for _ in range(7)]

    messages = asyncio.run(scenario())
    assert messages[:2] == ['"reply 1"', '"reply 2"']  # replies first; the oldest reply was dropped
    headers = [unpack_frame(m)[0] for m in messages[2:6]]
    assert [h.index for h in headers] == [6, 7, 8, 9] and {h.dropped for h in headers} == {6}
    assert messages[6] == '"done"'  # a stream event stays behind the frames queued before it


def test_outbox_waits_for_a_frames_pacing_slot():
    async def scenario():
        outbox = Outbox()
        outbox.put_frame(_frame(0, send_at=time.time() + 0.2))
        start = time.monotonic()
        await outbox.next_message()
        return time.monotonic() - start

    assert 0.15 < asyncio.run(scenario()) < 2.0


def test_pacer_keeps_real_time_and_never_bursts_after_falling_behind():
    pacer = Pacer(fps=10, realtime=True)
    assert pacer.wants_block(0, 0.5, now=100.0)
    pacer.on_block(0, now=100.0)
    assert pacer.slot(5) == pytest.approx(100.5)
    assert not pacer.wants_block(10, 0.5, now=100.2)  # frame 10 is due at 101.0: not yet
    assert pacer.wants_block(10, 0.5, now=100.6)
    pacer.on_block(10, now=103.0)  # two seconds late: the clock moves instead of bursting
    assert pacer.slot(10) == pytest.approx(103.0) and pacer.slot(11) == pytest.approx(103.1)
    fast = Pacer(fps=10, realtime=False)
    fast.on_block(0, now=100.0)
    assert fast.slot(50) == 0.0 and fast.wants_block(50, 0.5, now=100.0)


def test_pipelines_written_before_the_recache_option_keep_the_cache_on_a_switch(tiny_checkpoint, tmp_path):
    import json
    import shutil

    from causvid.pipeline import load_pipeline

    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    index = json.loads((old / "model_index.json").read_text())
    assert index.pop("switch_recache") is True  # the tiny preset distils with re-caching
    (old / "model_index.json").write_text(json.dumps(index))
    assert load_pipeline(old, "cpu", torch.float32).config.switch_recache is False
