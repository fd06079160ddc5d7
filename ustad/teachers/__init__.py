"""Teachers shipped with ustad: ``<name>.teacher.npz`` files (float16) listed with their SHA-256,
training record and probe figures in ``MANIFEST.json``. Load them by name
(``ustad.train.teacher.load_teacher("p33_small")``); list them with
``ustad.train.teacher_files.list_teachers()`` or ``ustad teachers``."""
