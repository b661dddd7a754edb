"""Evaluation: the field's PSNR/SSIM, the MATLAB bicubic baseline, benchmark protocols and reports.

Modules (imported directly, so the trainer's validator does not pull in matplotlib):

* ``metrics``: ``psnr``, ``ssim``, ``psnr_ssim``, ``rgb_to_y`` on H x W x 3 uint8 frames.
* ``bicubic``: ``bicubic_upsample``, MATLAB ``imresize(lr, 4, 'bicubic')``.
* ``protocols``: ``TestSet``, ``evaluate_model`` -> ``TestResult``, ``make_validator``.
* ``report``: ``write_reports`` (metrics.json, per_clip.csv, benchmark.md, plots/).
* ``config``: ``EvalConfig`` (params.yaml section ``eval``).
* ``stage``: ``run_evaluation``, the whole stage in one call.
"""
