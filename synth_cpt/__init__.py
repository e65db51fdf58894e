"""synth-cpt: synthetic continued-pretraining data from web-crawl drops, orchestrated by Dagster."""
