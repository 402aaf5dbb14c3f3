"""`first-kd demo`: the whole pipeline on tiny models and data built locally, one module per suite.

    main         DemoConfig (the options of every suite) and run_demo, which dispatches to the suite
    runner       what the suites share: the layout of DIR, Step, running the steps, commands.sh
    calibration  the calibration suite: FIRST on a noisy-label multiple-choice task
    reasoning    the reasoning suite: teacher-written rationales, filters and fast/slow traces

Every step is a public command run through the CLI entry (first_kd.cli.main), never imported directly.
"""
