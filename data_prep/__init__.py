"""Offline data stages (no torch): InsightFace RecordIO and .bin files → DALI-readable shards.

Modules, one concern each:
  recordio         MXNet .rec/.idx reading and writing (split records, IRHeader)
  source           an InsightFace dataset folder: layout, property, validation of every record
  shards           webdataset tar + DALI (wds2idx) index, deterministic bytes
  manifest         parquet schemas (manifest, classes, pairs) and atomic table writes
  dataset          dataset.json as `DatasetInfo`; `load_dataset_info(DIR)`
  sharded_output   a folder of shards written atomically, resumably, under a lock, dataset.json last
  conversion_plan  ConversionPlan (OUT/.prep/plan.json) and load_plan
  source_scan      validation, checksums and image hashes of a source in one pass; dropped records
  convert          prepare_conversion / write_shard / finalize_conversion / convert
  curate           curate filter: a quality-filtered copy of a converted dataset
  bins             verification .bin files through a restricted unpickler
  synth            the synthetic face dataset with quality ground truth
  inspect          counts, class-size histogram, checks
  atomic           temp + rename writes, checksums
  errors           DataError, raised for every bad input
"""
