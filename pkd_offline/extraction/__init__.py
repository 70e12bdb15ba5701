"""Stage one's library: the teacher's FPN maps of every (image, view) sample, encoded and written to a store.

One concept per module: ``plan`` (which samples go to which shards and batches, what a resumed run skips),
``layout`` (the stored levels and their shapes), ``teacher_maps`` (one batch's forward on the device),
``encode`` (encoding on the device and reading back), ``pca_fit`` (the pca codec's basis), ``pipeline`` (the
object that overlaps image loading, the forward, encoding and writing), ``writers`` (shard writer threads) and
``result`` (the record of a run). ``stages.extract`` wires them to an ``ExtractConfig``.
"""
