"""Training: corpora and token shards, self-generated data, the objectives, the trainer and the
shipped-model export.

Modules, from the data up: `errors`, `corpora` (text sources and their val split), `loader`
(reading shards, batches), `shards` (building them), `selfgen` (the model's own outputs as data),
`objectives` (the losses), `config` (TrainConfig), `checkpoint`, `distributed`, `prepare` (a run's
setup), `validation`, `trainer` (the loop), `export`. The command line lives in `tidar.cli`."""
