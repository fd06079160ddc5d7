"""Teachers shipped with ustad: ``<name>.teacher.npz`` files (float16) listed with their SHA-256,
training record and probe figures in ``MANIFEST.json``. Load them by name
(``ustad.load_teacher("p33_small")``); list them with ``ustad.list_teachers()`` or
``ustad teachers`` (:mod:`ustad.uninformed_students.teacher.catalog`)."""
