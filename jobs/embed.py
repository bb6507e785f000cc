from medray.cli import run_job

if __name__ == "__main__":
    run_job("embed")
