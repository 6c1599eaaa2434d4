import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mocoray.core.queue import KeyQueue


def _keys(start: int, n: int, dim: int = 2) -> torch.Tensor:
    # key i is the constant vector [i, i]: easy to read back
    return torch.arange(start, start + n, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_queue_is_fifo_and_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    q = KeyQueue(size=5, dim=2)
    q.enqueue(_keys(0, 2))  # slots 0,1
    q.enqueue(_keys(2, 2))  # slots 2,3
    assert int(q.ptr) == 4
    q.enqueue(_keys(4, 2))  # slot 4 then wraps to slot 0
    assert int(q.ptr) == 1
    assert q.keys[:, 0].tolist() == [5, 1, 2, 3, 4]
    # oldest to newest: 1,2,3,4,5 -- key 0 was the only one overwritten, none dropped
    assert q.ordered()[:, 0].tolist() == [1, 2, 3, 4, 5]
    q.enqueue(_keys(6, 3))
    assert q.ordered()[:, 0].tolist() == [4, 5, 6, 7, 8]
    assert int(q.ptr) == 4


def test_batch_larger_than_queue_keeps_newest_keys():
    q = KeyQueue(size=3, dim=2)
    q.enqueue(_keys(0, 1))
    q.enqueue(_keys(10, 7))
    assert q.ordered()[:, 0].tolist() == [14, 15, 16]


def test_queue_state_travels_in_state_dict():
    q = KeyQueue(size=4, dim=3)
    q.enqueue(torch.nn.functional.normalize(torch.randn(3, 3), dim=1))
    r = KeyQueue(size=4, dim=3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys, q.keys) and int(r.ptr) == 3


def test_initial_keys_are_unit_vectors():
    q = KeyQueue(size=16, dim=8)
    assert torch.allclose(q.keys.norm(dim=1), torch.ones(16))


class _HostReads(TorchDispatchMode):
    """Records every op that copies a tensor's value to the host (int(t), t.item(): a device sync on GPUs)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_enqueue_reads_nothing_back_from_the_device():
    q = KeyQueue(size=5, dim=2)
    with _HostReads() as mode:
        for start in range(0, 12, 3):
            q.enqueue(_keys(start, 3))
    assert mode.reads == 0
    assert int(q.ptr) == 12 % 5 and q.ordered()[:, 0].tolist() == [7, 8, 9, 10, 11]


def test_a_loaded_queue_writes_at_its_saved_pointer():
    q = KeyQueue(size=5, dim=2)
    q.enqueue(_keys(0, 3))
    r = KeyQueue(size=5, dim=2)
    r.load_state_dict(q.state_dict())
    r.enqueue(_keys(3, 3))  # slots 3, 4, then 0
    assert r.keys[:, 0].tolist() == [5, 1, 2, 3, 4] and int(r.ptr) == 1
    # inside a bigger module too (a MoCo checkpoint holds queue.keys / queue.ptr)
    outer, saved = torch.nn.Module(), torch.nn.Module()
    outer.queue, saved.queue = KeyQueue(size=5, dim=2), r
    outer.load_state_dict(saved.state_dict())
    outer.queue.enqueue(_keys(6, 1))
    assert outer.queue.keys[1, 0].item() == 6 and int(outer.queue.ptr) == 2
