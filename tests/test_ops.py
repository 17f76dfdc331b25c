"""lensdyn.ops beyond its doctests."""
import torch

from lensdyn.ops import Scratch


def test_scratch_hands_back_one_tensor_per_name_shape_and_dtype():
    scratch = Scratch()
    first = scratch.like("a", torch.zeros(3))
    assert scratch.like("a", torch.ones(3)) is first and scratch.like("b", torch.ones(3)) is not first
    assert scratch.like("a", torch.ones(4)).shape == (4,)
    assert scratch.like("a", torch.ones(4), torch.float64).dtype == torch.float64
