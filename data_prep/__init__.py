"""Offline data stages (no torch): InsightFace RecordIO and .bin files → DALI-readable shards.

Modules, one concern each:
  recordio   MXNet .rec/.idx reading and writing (split records, IRHeader)
  source     an InsightFace dataset folder: layout, property, validation of every record
  shards     webdataset tar + DALI (wds2idx) index, deterministic bytes
  manifest   parquet schemas (manifest, classes, pairs) and atomic table writes
  dataset    dataset.json as `DatasetInfo`; `load_dataset_info(DIR)`
  convert    prepare_conversion / write_shard / finalize_conversion / convert
  bins       verification .bin files through a restricted unpickler
  synth      the synthetic face dataset with quality ground truth
  inspect    counts, class-size histogram, checks
  atomic     temp + rename writes, checksums
  errors     DataError, raised for every bad input
"""
