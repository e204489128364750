"""Stage 2 (marginal network, maximum likelihood) on the mol config:
python mol_main.py load_pretrain=True loadpath_pretrain=<stage-1 checkpoint> [mode=train|eval|generate|score|export] [preset=tiny|cpu]"""
import hydra

from mamlib.cli import check_command_line, run_script


@hydra.main(config_path="../configs", config_name="mam_mol", version_base="1.3")
def main(cfg):
    run_script(cfg, "mam_mle")


if __name__ == "__main__":
    check_command_line("mam_mol")  # Hydra's own errors as one line, exit 2
    main()
