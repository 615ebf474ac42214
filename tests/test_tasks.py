"""The tasks: layouts as documented, seeded determinism, held-out splits, bad arguments."""

import pytest
import torch

from mamba_compiled.tasks import IGNORE, ByteLM, InductionHeads, SelectiveCopying, generator
from mamba_compiled.tasks.byte_lm import default_corpus


def test_generator_depends_on_seed_stream_and_index_only():
    draw = lambda *key: torch.randint(0, 1 << 30, (4,), generator=generator(*key))  # noqa: E731
    assert torch.equal(draw(0, "train", 3), draw(0, "train", 3))
    assert not torch.equal(draw(0, "train", 3), draw(0, "train", 4))
    assert not torch.equal(draw(0, "train", 3), draw(1, "train", 3))
    assert not torch.equal(draw(0, "train", 3), draw(0, "eval", 3))


@pytest.mark.parametrize(
    "seq_len, vocab, M",
    [
        pytest.param(4096, 16, 16, id="paper"),
        pytest.param(37, 5, 3, id="odd"),
        pytest.param(8, 3, 4, id="minimal"),
    ],
)
def test_selective_copying_layout(seq_len, vocab, M):
    task = SelectiveCopying(seq_len=seq_len, vocab_size=vocab, num_tokens=M)
    b = task.sample(6, generator(0, "train", 0))
    P = seq_len - M
    assert b.inputs.shape == b.targets.shape == (6, seq_len)
    assert b.inputs.dtype == b.targets.dtype == torch.long
    region = b.inputs[:, :P]
    data = b.targets[:, P:]  # the answers
    assert ((data >= 1) & (data <= vocab - 2)).all()
    assert (b.targets[:, :P] == IGNORE).all()
    assert (b.inputs[:, P] == vocab - 1).all()  # the separator
    assert torch.equal(b.inputs[:, P + 1 :], data[:, :-1])  # teacher forcing
    for row in range(6):
        kept = region[row][region[row] != 0]  # the data tokens, in order, among the noise
        assert torch.equal(kept, data[row])
    assert b.num_targets == 6 * M
    prompt, answer = task.split_for_generation(b)
    assert prompt.shape == (6, P + 1) and torch.equal(answer, data)


@pytest.mark.parametrize("seq_len, vocab, M", [(4096, 16, 16), (37, 5, 3), (8, 3, 4)])
def test_selective_copying_markers_layout(seq_len, vocab, M):
    """The paper's data (S4's generator): M markers at the end, the k-th answer at the k-th."""
    task = SelectiveCopying(seq_len, vocab, M, answer_format="markers")
    b = task.sample(6, generator(0, "train", 0))
    P = seq_len - M
    assert b.inputs.shape == b.targets.shape == (6, seq_len)
    data = b.targets[:, P:]
    assert ((data >= 1) & (data <= vocab - 2)).all()
    assert (b.targets[:, :P] == IGNORE).all()
    assert (b.inputs[:, P:] == vocab - 1).all()  # nothing but markers after the data
    for row in range(6):
        region = b.inputs[row, :P]
        assert torch.equal(region[region != 0], data[row])
    assert b.num_targets == 6 * M
    # The same draw as the copy format: only the tail differs.
    copy = SelectiveCopying(seq_len=seq_len, vocab_size=vocab, num_tokens=M)
    c = copy.sample(6, generator(0, "train", 0))
    assert torch.equal(c.inputs[:, :P], b.inputs[:, :P]) and torch.equal(c.targets, b.targets)
    with pytest.raises(ValueError, match="answer_format 'copy'"):
        task.split_for_generation(b)


def test_selective_copying_positions_vary_and_are_seeded():
    task = SelectiveCopying(seq_len=64, vocab_size=16, num_tokens=8)
    a = task.sample(16, generator(3, "train", 0))
    b = task.sample(16, generator(3, "train", 0))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    positions = {tuple((row[:56] != 0).nonzero().flatten().tolist()) for row in a.inputs}
    assert len(positions) == 16  # content-dependent: every sequence puts its data elsewhere


@pytest.mark.parametrize("seq_len", [3, 16, 255, 1024])
def test_induction_heads_layout(seq_len):
    vocab = 16
    task = InductionHeads(seq_len=256, vocab_size=vocab)
    b = task.sample(32, generator(0, "eval", 1), seq_len=seq_len)
    s = vocab - 1
    assert b.inputs.shape == (32, seq_len)
    assert (b.inputs[:, -1] == s).all()
    assert ((b.inputs == s).sum(1) == 2).all()  # the special token once, then at the end
    assert (b.targets[:, :-1] == IGNORE).all()
    for row in range(32):
        p = (b.inputs[row] == s).nonzero()[0, 0]
        assert b.targets[row, -1] == b.inputs[row, p + 1]
        assert b.targets[row, -1] != s
    assert b.num_targets == 32


@pytest.mark.parametrize(
    "make, match",
    [
        pytest.param(lambda: SelectiveCopying(vocab_size=2), "vocab_size", id="sc-vocab"),
        pytest.param(lambda: SelectiveCopying(num_tokens=0), "num_tokens", id="sc-tokens"),
        pytest.param(lambda: SelectiveCopying(seq_len=20, num_tokens=11), "seq_len", id="sc-len"),
        pytest.param(
            lambda: SelectiveCopying(answer_format="echo"), "answer_format", id="sc-format"
        ),
        pytest.param(lambda: InductionHeads(seq_len=2), "seq_len", id="ih-len"),
        pytest.param(lambda: InductionHeads(vocab_size=2), "vocab_size", id="ih-vocab"),
        pytest.param(lambda: ByteLM(seq_len=0), "seq_len", id="bytes-len"),
        pytest.param(lambda: ByteLM(val_percent=0), "val_percent", id="bytes-val"),
        pytest.param(lambda: ByteLM(data="/no/such/path"), "data", id="bytes-missing"),
    ],
)
def test_bad_task_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_sample_length_too_short_is_refused():
    with pytest.raises(ValueError, match="seq_len"):
        SelectiveCopying(seq_len=64, num_tokens=8).sample(2, generator(0, "x", 0), seq_len=15)


@pytest.fixture
def corpus(tmp_path):
    """40 small files with distinct contents."""
    for i in range(40):
        (tmp_path / f"dir{i % 3}").mkdir(exist_ok=True)
        (tmp_path / f"dir{i % 3}" / f"f{i}.txt").write_bytes(
            f"file {i}: ".encode() + bytes(range(i, i + 200))
        )
    return tmp_path


def test_byte_lm_folder_split_by_file(corpus):
    task = ByteLM(seq_len=16, data=corpus, val_percent=20)
    assert task.vocab_size == 256 and task.num_files == 40
    train, val = bytes(task.train.tolist()), bytes(task.val.tolist())
    assert len(train) > 0 and len(val) > 0
    for i in range(40):  # each file lies wholly in one split
        header = f"file {i}: ".encode()
        assert (header in train) != (header in val)
    b = task.sample(5, generator(0, "train", 0))
    assert b.inputs.shape == b.targets.shape == (5, 16)
    assert torch.equal(b.inputs[:, 1:], b.targets[:, :-1])  # next-byte prediction
    for row in b.inputs:
        assert bytes(row.tolist()) in train
    first = [x.inputs for x in task.eval_batches(4, max_tokens=100)]
    again = [x.inputs for x in task.eval_batches(4, max_tokens=100)]
    assert len(first) == 2 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sum(len(x) for x in first) == 7  # ceil(100 / 16) windows


def test_byte_lm_single_file_tail_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(bytes(range(256)) * 4)
    task = ByteLM(seq_len=8, data=f, val_percent=10)
    assert len(task.val) == 102 and len(task.train) == 1024 - 102
    assert bytes(task.val.tolist()) == (bytes(range(256)) * 4)[-102:]


def test_byte_lm_too_little_data(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="seq-len"):
        ByteLM(seq_len=64, data=f)


def test_default_corpus_is_the_standard_library():
    root = default_corpus()
    assert (root / "os.py").is_file()
