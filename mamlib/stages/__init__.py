"""Stage runners behind the thin entry scripts: ao_arm (stage 1), mam_mle (stage 2), energy (energy-based)."""
