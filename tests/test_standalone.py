"""Each folder copied alone into an empty directory outside the repository, with its own virtualenv
built from its own requirements.txt and configured by its `.env` alone, runs the ways its README
says: `gunicorn app:app`, `python app.py`, and (for trying it out) `flask --app app run`.

The shared contract runs against these copies too: see the `server` fixture of test_contract.py.
"""

import signal

import pytest

from conftest import FOLDERS, ROOT, free_port, load_fixture, post_chat, read_sse, streamed_text

FIRST_TURN = load_fixture("first-turn.json")
ANSWER = "You said: " + FIRST_TURN["messages"][-1]["content"]


@pytest.fixture(params=FOLDERS)
def copy(request, copied_folders):
    """The folder's copy, its virtualenv built and its .env written (all three built at once)."""
    return copied_folders.copy(request.param)


def assert_streams_an_answer(server):
    """A Vapi first turn gets the stand-in's whole answer as a stream that ends with [DONE]."""
    response = post_chat(server, FIRST_TURN)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, done = read_sse(response)
    assert done and streamed_text(events) == ANSWER, (events, server.log())


def test_the_copy_is_the_folder_alone(copy):
    assert not copy.path.resolve().is_relative_to(ROOT)
    assert list(copy.path.parent.iterdir()) == [copy.path], "alone in its directory"
    dotenv = (copy.path / ".env").read_text()
    assert f"PORT={copy.port}\n" in dotenv and "OPENAI_BASE_URL=http://127.0.0.1:" in dotenv


def test_gunicorn_app_app_serves_on_the_port_from_dotenv(copy, copied_folders):
    server = copied_folders.gunicorn(copy.folder)
    assert_streams_an_answer(server)


def test_python_app_py_runs_the_same_server(copy, copied_folders):
    copied_folders.stop_gunicorn(copy.folder)  # `python app.py` serves on the same .env port
    server = copy.start("python", "app.py")
    try:
        assert_streams_an_answer(server)
    finally:
        server.stop()


@pytest.fixture
def flask_run(copy):
    """`flask --app app run` in the copy, on a free port."""
    port = free_port()
    server = copy.start("flask", "--app", "app", "run", "--port", str(port), port=port,
                        stop_signal=signal.SIGTERM)
    yield server
    server.stop()


def test_flask_run(copy, flask_run, fake):
    if copy.folder == "basic":
        assert_streams_an_answer(flask_run)
        return
    # Flask's development server has no gevent: a streamed answer would hold a whole thread and
    # could not stop the provider when the caller hangs up, so the streaming folders refuse it.
    response = post_chat(flask_run, {**FIRST_TURN, "stream": True})
    assert response.status_code == 500, response.text[:300]
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "gevent_required"
    assert "gunicorn app:app" in error["message"]
    assert fake.chat_bodies() == [], "a refused request does not reach the provider"

    response = post_chat(flask_run, {**FIRST_TURN, "stream": False})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["object"] == "chat.completion"
    assert response.json()["choices"][0]["message"]["content"] == ANSWER
