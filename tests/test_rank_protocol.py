"""The rank protocol of a multi-GPU run (job/distributed.py: RankProtocol) with a fake broadcast.

Rank 0's words are recorded by a fake `send`; another rank's `send` hands out the recorded words in
order, as torch.distributed's broadcast on the control group would. The real thing, two processes
under torchrun with gloo, is tests/test_distributed.py.
"""

import pytest

from job.config import load_config
from job.distributed import SINGLE, RankProtocol, Ranks
from job.errors import InputError, MainProcessFailed
from job.pipeline import Pipeline, Stage
from job.storage import open_store

RANK0, RANK1 = Ranks(rank=0, local_rank=0, world_size=2), Ranks(rank=1, local_rank=1, world_size=2)


class Rank0Words:
    """Rank 0's side of the control group: records what it sends."""

    def __init__(self):
        self.sent = []

    def __call__(self, word):
        assert word is not None, "rank 0 always sends a word"
        self.sent.append(word)
        return word


class OtherRankWords:
    """Another rank's side: each call returns rank 0's next word (`words` may still be filling up)."""

    def __init__(self, words):
        self.words, self.heard = words, 0

    def __call__(self, word):
        assert word is None, "the other ranks only listen"
        self.heard += 1
        return self.words[self.heard - 1]


def never_called(word):
    raise AssertionError(f"a single process sends nothing, got {word!r}")


def test_single_process_sends_nothing_and_waits_for_nothing():
    protocol = RankProtocol(SINGLE, send=never_called)
    ran = []
    protocol.wait(ran.append)
    with protocol.ending():
        with protocol.all_ranks({"stage": "train"}):
            ran.append("train")
    protocol.release(RuntimeError("not sent either"))
    assert ran == ["train"]


def test_rank0_announces_all_ranks_stages_then_ends_the_others_once():
    send = Rank0Words()
    protocol = RankProtocol(RANK0, send=send)
    protocol.wait(lambda word: pytest.fail("rank 0 never waits"))  # returns at once on rank 0
    with protocol.ending():
        with protocol.all_ranks({"stage": "train", "fingerprint": "f1"}):
            assert send.sent == [{"stage": "train", "fingerprint": "f1"}]  # before the stage's body
    protocol.release()  # a second release sends nothing
    assert send.sent == [{"stage": "train", "fingerprint": "f1"}, {"exit_code": 0, "message": ""}]


@pytest.mark.parametrize("error, code", [(InputError("data.uri: no such file"), 2), (RuntimeError("boom"), 1),
                                         (KeyboardInterrupt(), 1)])
def test_rank0_failing_outside_an_all_ranks_stage_sends_its_exit_code(error, code):
    send = Rank0Words()
    with pytest.raises(type(error)):
        with RankProtocol(RANK0, send=send).ending():
            raise error
    assert send.sent == [{"exit_code": code, "message": f"rank 0 stopped: {error}"}]


def test_rank0_failing_inside_an_all_ranks_stage_sends_no_stop_word():
    """The others are inside the same stage (training): they end with it, not by a word they would
    never read."""
    send = Rank0Words()
    protocol = RankProtocol(RANK0, send=send)
    with pytest.raises(RuntimeError):
        with protocol.ending():
            with protocol.all_ranks({"stage": "train"}):
                raise RuntimeError("out of memory")
    assert send.sent == [{"stage": "train"}]


def test_other_rank_runs_each_announced_stage_until_the_stop_word():
    words = [{"stage": "train", "fingerprint": "a"}, {"stage": "train", "fingerprint": "b"},
             {"exit_code": 0, "message": ""}]
    ran = []
    RankProtocol(RANK1, send=OtherRankWords(words)).wait(ran.append)
    assert [w["fingerprint"] for w in ran] == ["a", "b"]


def test_other_rank_ends_with_rank0s_exit_code():
    words = [{"exit_code": 3, "message": "rank 0 stopped: s3://b/run: access denied"}]
    with pytest.raises(MainProcessFailed, match="access denied") as failed:
        RankProtocol(RANK1, send=OtherRankWords(words)).wait(lambda word: pytest.fail("no stage was announced"))
    assert failed.value.exit_code == 3


def test_other_rank_ends_and_sends_nothing_as_rank0():
    protocol = RankProtocol(RANK1, send=OtherRankWords([]))
    with protocol.ending():  # only rank 0 ends the others
        with protocol.all_ranks({"stage": "train"}):
            pass


def two_rank_pipelines(tmp_path):
    """Rank 0's and rank 1's pipelines over one run folder, with fake stages; train runs on all ranks."""
    cfg = load_config(None, (f"run_uri={tmp_path / 'run'}", "data.uri=/d.csv", "model.uri=/m"), environ={})
    calls = []

    def stage(name):
        def run(cfg, ctx):
            calls.append((name, ctx.ranks.rank, ctx.fingerprint, sorted(ctx.upstream)))
            if ctx.ranks.is_main:
                ctx.store.write_text(f"{name}/result.txt", name)
            return {}
        return run

    def stages():
        return [Stage("format", stage("format"), ("data",), outputs=("format",)),
                Stage("train", stage("train"), ("train",), needs=("format",), outputs=("train",), all_ranks=True),
                Stage("merge", stage("merge"), ("merge",), needs=("train",), outputs=("merge",))]

    send = Rank0Words()
    store = open_store(str(tmp_path / "run"))
    rank0 = Pipeline(stages(), cfg, store, tmp_path / "work0", ranks=RANK0, protocol=RankProtocol(RANK0, send=send))
    rank1 = Pipeline(stages(), cfg, store, tmp_path / "work1", ranks=RANK1,
                     protocol=RankProtocol(RANK1, send=OtherRankWords(send.sent)))
    return rank0, rank1, send, calls


def test_pipeline_announces_only_all_ranks_stages_and_the_other_rank_runs_them(tmp_path):
    rank0, rank1, send, calls = two_rank_pipelines(tmp_path)
    with rank0.protocol.ending():
        results = rank0.run()
    fingerprint = results["train"]["fingerprint"]
    assert [w.get("stage") for w in send.sent] == ["train", None]  # train, then the stop word
    assert send.sent[0]["fingerprint"] == fingerprint and send.sent[0]["hidden"] == []
    assert send.sent[0]["upstream"]["format"]["fingerprint"] == results["format"]["fingerprint"]

    rank1.protocol.wait(rank1.run_announced)  # replays rank 0's words
    assert calls[-1] == ("train", 1, fingerprint, ["format"])
    assert [c[0] for c in calls if c[1] == 1] == ["train"]  # format and merge: rank 0 alone


def test_pipeline_failure_before_training_ends_the_other_rank_with_its_code(tmp_path):
    rank0, rank1, send, calls = two_rank_pipelines(tmp_path)
    rank0.stages["format"].run = lambda cfg, ctx: (_ for _ in ()).throw(InputError("data.uri: no rows"))
    with pytest.raises(InputError):
        with rank0.protocol.ending():
            rank0.run()
    assert send.sent == [{"exit_code": 2, "message": "rank 0 stopped: data.uri: no rows"}]
    with pytest.raises(MainProcessFailed) as failed:
        rank1.protocol.wait(rank1.run_announced)
    assert failed.value.exit_code == 2 and calls == []
