"""The feature store's error type for faults a user can cause (missing, corrupt or mismatched stores)."""


class StoreError(Exception):
    """A user-facing store fault: one line saying what is wrong and what to do, naming the shard, sample or path.

    It does not derive from the training code's error type, because `storage` must import
    without the training code; the CLI catches both.
    """
