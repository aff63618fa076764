"""What a run leaves for people to read: the run report's plots and tables (`run_report`), the model card
(`model_card`), the quickstart's report (`quickstart_report`), its stages, plan and summary (`stages`), the live
dashboard (`dashboard`), and the markdown helpers they share (`markdown`)."""
