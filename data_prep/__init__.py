"""Offline data stages (no torch): InsightFace RecordIO and .bin files, image folders and .lst lists
→ DALI-readable shards.

Modules, one concern each:
  recordio         MXNet .rec/.idx reading and writing (split records, IRHeader; the .idx as arrays)
  source           an InsightFace dataset folder: layout, property, validation of every record
  shards           webdataset tar + DALI (wds2idx) index, deterministic bytes
  manifest         parquet schemas (manifest, classes, pairs), atomic table writes; rows grouped by
                   shard in one pass, the rows of some shards read without the rest
  dataset          dataset.json as `DatasetInfo`; `load_dataset_info(DIR)`
  sharded_output   a folder of shards written atomically, resumably, under a lock, dataset.json last
  conversion_plan  ConversionPlan (OUT/.prep/plan.json) and load_plan
  source_scan      validation, checksums and image hashes of a source in one pass; dropped records
  file_source      an image folder (ROOT/<identity>/<image>) or .lst list: its entries, labels, problems
  file_scan        every listed file read once: checks, 112x112 or resize, hashes, lineage fingerprints
  file_conversion  the plan of an image folder or list; a shard's files read back
  convert          prepare_conversion / write_shard / finalize_conversion / convert
  curate           curate filter: a quality-filtered copy of a converted dataset (here or as array tasks)
  curation_rule    the curation rules (lowest:F, lowest-per-identity:F, below:T) and what they keep
  bins             verification .bin files through a restricted unpickler
  synth            the synthetic face dataset with quality ground truth; identity-labelled sets
  inspect          counts, class-size histogram, checks
  atomic           temp + rename writes, checksums
  errors           DataError, raised for every bad input
"""
