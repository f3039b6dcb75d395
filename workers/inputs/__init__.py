"""Input that stays exact on any host count: the global batch of a step (`batch`), Grain's elastic
iterator and the batch fingerprint (`data`)."""
