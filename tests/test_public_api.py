import cocoon_faas


def test_public_names_are_pinned_and_sorted():
    assert cocoon_faas.__all__ == sorted(cocoon_faas.__all__)
    assert {"function", "cls", "enter", "method", "batched", "Client", "CocoonError"} <= set(cocoon_faas.__all__)
    for name in cocoon_faas.__all__:
        assert hasattr(cocoon_faas, name)
