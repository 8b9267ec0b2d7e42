"""What a run shows: report.md/report.html from the files the stages wrote, the terminal display,
`compare`, and the DAG picture. Reads outputs; computes nothing a stage computes."""
