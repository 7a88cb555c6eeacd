"""What users call: compile(), transform(), explain(), policies and configs."""
