"""Small fixtures in each source's own format, generated here (the real files stay in ../shared)."""

import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tldr_rows():
    """6 workers: w0 has 5 comparisons, w1 4, w2 3, w3..w5 1 each; one pair of equal length, one identical."""
    rows = []
    workers = ["w0"] * 5 + ["w1"] * 4 + ["w2"] * 3 + ["w3", "w4", "w5"]
    for i, w in enumerate(workers):
        short, long = f" short summary {i}", f" a much longer summary of post number {i} with many words"
        rows.append({"info": {"id": f"t3_{i % 7}", "post": f"Post body {i % 7} " + "word " * 50, "title": f"Title {i % 7}",
                              "subreddit": "relationships"},
                     "split": "valid1", "summaries": [{"text": short, "policy": "sup4_12b_t0.7", "note": ""},
                                                      {"text": long, "policy": "sup4_ppo_rm4_t.7" if i % 3 else "sup2_t0.7"}],
                     "choice": i % 2, "worker": w, "batch": "batch13", "extra": {"confidence": 7}})
    rows.append({**rows[0], "summaries": [{"text": " same words here", "policy": "sup1"}, {"text": " same other words", "policy": "sup2"}],
                 "worker": "w0"})  # equal length in words
    rows.append({**rows[1], "summaries": [{"text": " identical", "policy": "sup1"}, {"text": " identical", "policy": "sup2"}],
                 "worker": "w1"})
    return rows


def psoups_files(folder: Path) -> Path:
    """RLPHF layout: P1A.json ... with user_input / completion_a (chosen) / completion_b."""
    prefs = {"P1A": "Generate a response that can be easily understood by an elementary school student.",
             "P1B": "Generate a response that only a PhD Student in that specific field could understand.",
             "P2A": "Generate a response that is concise and to the point, without being verbose."}
    folder.mkdir(parents=True, exist_ok=True)
    for pid, pref in prefs.items():
        rows = [{"user_input": f"Explain topic {k}. {pref}", "completion_a": f"{pid} style answer {k}",
                 "completion_b": f"other answer {k}"} for k in range(6)]
        rows.append({"user_input": f"Explain topic 99. {pref}", "completion_a": "same", "completion_b": "same"})
        (folder / f"{pid}.json").write_text(json.dumps(rows))
    return folder


def prism_folder(folder: Path) -> Path:
    """survey.jsonl and conversations.jsonl following PRISM's documented schema."""
    folder.mkdir(parents=True, exist_ok=True)
    survey = []
    for u in range(5):
        survey.append({
            "user_id": f"user{u}", "survey_only": False, "num_completed_conversations": 2, "consent": "Yes",
            "consent_age": "Yes", "lm_familiarity": "Very familiar", "lm_indirect_use": "Yes", "lm_direct_use": "Yes",
            "lm_frequency_use": "Every day", "self_description": f"I value honesty and family. Participant {u}.",
            "system_string": "Be concise.", "age": "25-34 years old", "gender": "Female" if u % 2 else "Male",
            "employment_status": "Working full-time", "education": "University Bachelors Degree",
            "marital_status": "Never been married", "english_proficiency": "Native speaker",
            "study_id": "s1", "study_locale": "uk",
            "religion": {"self_described": "", "categorised": "No religion", "simplified": "No religion"},
            "ethnicity": {"self_described": "", "categorised": "White", "simplified": "White"},
            "location": {"birth_country": "United Kingdom", "birth_region": "Europe", "reside_country": "United Kingdom",
                         "reside_region": "Europe", "reside_subregion": "Northern Europe", "special_region": "UK"},
            "lm_usecases": {"research": 1, "games": 0}, "order_lm_usecases": {"research": 1, "games": 2},
            "stated_prefs": {"values": 80, "creativity": 50, "fluency": 90, "factuality": 100, "diversity": 60,
                             "safety": 70, "personalisation": 20, "helpfulness": 95},
            "order_stated_prefs": {"values": 1, "creativity": 2}, "timing_duration_s": 600.0,
            "timing_duration_mins": 10.0, "included_in_US_REP": False, "included_in_UK_REP": True,
            "included_in_balanced_subset": True})
    conversations = []
    for u in range(5):
        for c in range(2):
            cid = f"c{u}_{c}"
            hist = [{"turn": 0, "role": "user", "content": f"Hello from user{u}, conversation {c}", "model_provider": None,
                     "model_name": None, "score": None, "if_chosen": None, "within_turn_id": None}]
            for k in range(4):  # opening turn: four models
                hist.append({"turn": 0, "role": "model", "content": f"opening answer {k} for {cid}", "model_provider": "p",
                             "model_name": f"model{k}", "score": 90 - 10 * k, "if_chosen": k == 0, "within_turn_id": k})
            hist.append({"turn": 1, "role": "user", "content": "Tell me more", "model_provider": None, "model_name": None,
                         "score": None, "if_chosen": None, "within_turn_id": None})
            for k in range(2):  # later turns: A and B responses of the chosen model
                hist.append({"turn": 1, "role": "model", "content": f"follow-up {k} for {cid}", "model_provider": "p",
                             "model_name": "model0", "score": 70 if k == 0 else 70 - 20 * (c == 0),
                             "if_chosen": k == 0, "within_turn_id": k})
            conversations.append({"conversation_id": cid, "user_id": f"user{u}", "generated_datetime": "2023-11-22",
                                  "timing_duration_s": 100.0, "timing_duration_mins": 1.7,
                                  "conversation_type": "unguided", "opening_prompt": f"Hello from user{u}",
                                  "conversation_turns": 2, "conversation_history": hist,
                                  "performance_attributes": {}, "choice_attributes": {}, "open_feedback": "fine",
                                  "included_in_balanced_subset": True})
    conversations.append({**conversations[0], "conversation_id": "orphan", "user_id": "ghost"})
    write_jsonl(folder / "survey.jsonl", survey)
    write_jsonl(folder / "conversations.jsonl", conversations)
    return folder


def dsp_rows():
    rows = []
    for q in range(8):
        rows.append({"query": f"Question {q}?", "responses": {d: f"{d} answer {q}" for d in
                                                            ("academy", "business", "entertainment", "literature", "normal")}})
    rows[0]["responses"]["business"] = rows[0]["responses"]["academy"]  # identical candidates are skipped
    return rows
