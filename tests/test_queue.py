import torch

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
