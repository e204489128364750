"""Stage 1 (any-order ARM) on the mol config: python mol_main.py [mode=train|eval|generate|score|export] [preset=tiny|cpu] [key=value ...]"""
import hydra

from mamlib.cli import check_command_line, run_script


@hydra.main(config_path="../configs", config_name="ao_arm_mol", version_base="1.3")
def main(cfg):
    run_script(cfg, "ao_arm")


if __name__ == "__main__":
    check_command_line("ao_arm_mol")  # Hydra's own errors as one line, exit 2
    main()
