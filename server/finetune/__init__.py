"""The server side of finetuning jobs: requests, training data, and the job lifecycle."""
