"""Running a model on whole volumes: segment, int8, ensembles, predict."""
