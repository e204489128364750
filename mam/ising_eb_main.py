"""Energy-based training (ising_eb): python ising_eb_main.py [model=MAM|ARM] [objective=KL|squared] [mode=train|evaluate|generate|score|export|grad_variance] [preset=tiny|cpu]"""
import hydra

from mamlib.cli import check_command_line, run_script


@hydra.main(config_path="../configs", config_name="ising_eb", version_base="1.3")
def main(cfg):
    run_script(cfg, "energy")


if __name__ == "__main__":
    check_command_line("ising_eb")  # Hydra's own errors as one line, exit 2
    main()
