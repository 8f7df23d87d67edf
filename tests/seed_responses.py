"""The example responses of ``POST /predict`` in the seed projects' READMEs, as their clients were written against
them: the hallux valgus seed ("Hallux Valgus Detection API", PRODUCTION_README.md, "API Response Format") and
the bone-age seed ("Bone Age Estimation Backend", README.md, "1. Predict Bone Age"). Copied as published; the
values are the seeds' examples, not measurements of anything."""

HALLUX_VALGUS_SEED = {
    "prediction": "Hallux Valgus",
    "confidence": 96.8,
    "hallux_valgus_detected": True,
    "probabilities": {"Normal": 2.1, "Flatfoot": 0.8, "Foot Ulcer": 0.3, "Hallux Valgus": 96.8},
    "inference_time": 0.096,
    "model_info": {"name": "MONAI DenseNet121", "accuracy": "98.8%", "hallux_valgus_recall": "99.6%"},
}

BONE_AGE_SEED = {
    "status": "success",
    "patient_id": "PATIENT001",
    "prediction_id": 1,
    "mlflow_run_id": "abc123...",
    "male_prediction": {
        "age": 12.5,
        "uncertainty_sigma": 0.234,
        "gradcam_path": "storage/patients/PATIENT001/male_gradcam.png",
        "gradcam_url": "/storage/PATIENT001/male_gradcam.png",
    },
    "female_prediction": {
        "age": 11.8,
        "uncertainty_sigma": 0.198,
        "gradcam_path": "storage/patients/PATIENT001/female_gradcam.png",
        "gradcam_url": "/storage/PATIENT001/female_gradcam.png",
    },
    "timestamp": "2026-02-03T19:30:00",
    "message": "Male & Female Bone Age Results",
}
