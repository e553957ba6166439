from common.cli import run_main
from data.prepare import main

if __name__ == "__main__":
    run_main(main)
