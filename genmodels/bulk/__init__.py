"""Bulk generation: millions of samples written to object storage as shards plus a manifest.

A job is a :class:`JobSpec` (model name and resolved version, ``n``, seed, labels, temperature,
shard size, format, output URL). Its output prefix holds::

    job.json                    the job (spec + sha256 of the model's graphs), written first
    shards/shard-00000.npz      shard k: samples [k*shard_size, min(n, (k+1)*shard_size))
    ...                         (.npz, .tar or .parquet: the folder holds nothing but shards)
    sidecars/shard-00000.json   shard k's sidecar record (key, count, start, end, sha256, bytes),
                                written after the shard object
    manifest.json               written last: the job, the model, every shard record, totals

``shards/`` holds the shard objects only, so a reader given the folder (``pyarrow.dataset``,
``pandas.read_parquet``, ``ray.data.read_parquet``, ``datasets.load_dataset("parquet")``,
``ray.data.read_webdataset``) reads every sample once and nothing else. Outputs written before
sidecars moved out (``shards/shard-00000.json``) still resume: a resume moves each sidecar that
verifies to ``sidecars/`` (removing one that does not), leaving ``shards/`` to the shards.

Every object is written with one atomic put. Sample ``i`` is image ``i`` of the seed under
:meth:`genmodels.sampling.OnnxSampler.sample`, so it is the same whatever the shard size, the
number of workers or how often the job was restarted, and a shard's bytes depend only on the
job and the shard index. That makes the job resumable: a shard whose sidecar exists and whose
object still hashes to the sidecar's sha256 is skipped; any other is (re)written. Re-running a
finished job verifies every shard and writes nothing.

Shard formats (bytes are a pure function of the samples):

- ``npz`` (``np.load``-able, stored without compression so that the bytes do not depend on the
  zlib build): ``images`` uint8 [count, C, H, W], ``index`` int64 [count] (sample indices),
  ``labels`` int64 [count] for class-conditional models only.
- ``png``: an uncompressed tar in the webdataset layout: ``<index:09d>.png`` per sample (grey
  for one channel, RGB for three) and ``<index:09d>.cls`` (the label as text) for conditional
  models; members sorted by index, mtime 0, uid/gid 0. PNG bytes come from Pillow's zlib at a
  fixed level: identical on one build, possibly not across zlib builds (resume is unaffected:
  it checks each shard against the sha256 recorded when *that* shard was written).
- ``parquet``: one file, rows sorted by index, columns ``index`` int64, ``label`` int64 (null
  for unconditional models), ``image`` binary (the PNG bytes of the ``png`` format), ``height``,
  ``width``, ``channels`` int32; uncompressed (PNG is compressed already), one row group per
  :data:`_CHUNK` rows. Bytes are identical for one pyarrow and zlib build (the file names its
  writer, ``parquet-cpp-arrow version X``); resume is unaffected, as for ``png``.

Pixel values: ``uint8 = round(255 * intensity)`` for every family. Samplers on the
quantization grid (mixture, PixelRNN) give level ``k`` of ``L`` as ``round(255 * k / (L - 1))``:
binary images hold {0, 255}, 8-bit images their level exactly; VAE/CVAE/GAN intensities
(decoder means, generator outputs in [0, 1]) are rounded to the nearest of 256 grey levels.

:func:`run_job` runs a job in-process or on Ray: one-CPU actors in a placement group sized to
what the cluster can place (in-process when it can place none), each building one sampler from
the graphs' bytes and writing whole shards; a shard whose actor died is retried on a fresh one.
It keeps no global state, reports progress through ``on_progress`` and stops at
``should_stop`` within a fraction of a second, so a long-lived server can run many.
"""

from genmodels.bulk.manifest import ShardMismatch, read_manifest, read_shard, verify
from genmodels.bulk.runner import run_job
from genmodels.bulk.shards import decode_shard, encode_shard
from genmodels.bulk.spec import (
    DEFAULT_SHARD_SIZE, FORMATS, JOB_FORMAT, MANIFEST_KEY, MAX_N, MAX_SHARD_SIZE, MAX_SHARDS, SHARDS_DIR, JobCancelled,
    JobRefused, JobSpec, check_output_root, job_id, shard_key, shard_plan,
)
from genmodels.bulk.writer import build_sampler

__all__ = [
    "DEFAULT_SHARD_SIZE", "FORMATS", "JOB_FORMAT", "MANIFEST_KEY", "MAX_N", "MAX_SHARDS", "MAX_SHARD_SIZE",
    "JobCancelled", "JobRefused", "JobSpec", "SHARDS_DIR", "ShardMismatch", "build_sampler", "check_output_root",
    "decode_shard", "encode_shard", "job_id", "read_manifest", "read_shard", "run_job", "shard_key", "shard_plan", "verify",
]
