"""openai-advanced's knowledge in Japanese, Chinese and Korean as well as English and German: the
question finds the passage that answers it, and a question the documents do not cover finds none."""

import time

import pytest

from conftest import (FIXTURES, FOLDERS, phone_call, post_chat, read_sse, system_prompt,
                      wait_for)

pytestmark = pytest.mark.skipif("openai-advanced" not in FOLDERS, reason="no folder yet")
KNOWLEDGE = "Clinic information for this question:"  # the heading prompt.md puts above the passages


@pytest.fixture
def clinic(start_server):
    """A server whose knowledge is one short clinic document per language."""
    return start_server("openai-advanced", KNOWLEDGE_DIR=str(FIXTURES / "knowledge-languages"))


def passages_for(server, fake, question):
    """The passages the model got for this question, most relevant first."""
    events, done = read_sse(post_chat(server, phone_call(question)))
    assert done
    prompt = system_prompt(fake.chat_bodies()[0])
    if KNOWLEDGE not in prompt:
        return []
    lines = prompt.split(KNOWLEDGE, 1)[1].strip().splitlines()
    return [line[2:] for line in lines if line.startswith("- [")]


@pytest.mark.parametrize("question, section", [
    ("診療時間は何時からですか？", "[診療案内: 診療時間]"),
    ("駐車場はありますか", "[診療案内: 駐車場]"),
    ("保険は使えますか？", "[診療案内: 保険]"),
    ("土曜日も診てもらえますか", "[診療案内: 診療時間]"),
    ("予約をキャンセルしたいんですが", "[診療案内: 予約のキャンセル]"),
    ("あの、すみません、明日の午後に行きたいんですけど、車で行っても駐車場はありますか",
     "[診療案内: 駐車場]"),
    ("待合室でWi-Fiは使えますか", "[診療案内: Ｗｉ－Ｆｉ]"),  # full-width in the document
    ("你们的营业时间是什么时候？", "[诊所指南: 营业时间]"),
    ("周六开门吗？", "[诊所指南: 营业时间]"),
    ("你好，我想问一下你们周六营业吗", "[诊所指南: 营业时间]"),
    ("坐地铁怎么去？", "[诊所指南: 交通]"),
    ("可以用微信支付吗？", "[诊所指南: 付款方式]"),
    ("보험은 어떤 것을 받으시나요?", "[병원 안내: 보험]"),  # 보험은 asks about 보험
    ("주차장이 있나요?", "[병원 안내: 주차]"),
    ("혹시 주차할 수 있는 곳이 있나요?", "[병원 안내: 주차]"),
    ("토요일에도 진료하나요?", "[병원 안내: 진료 시간]"),
    ("What are your opening hours?", "[Clinic guide: Opening hours]"),
    ("Do you see children?", "[Clinic guide: Children]"),
    ("Welche Versicherungen akzeptieren Sie?", "[Praxisinformationen: Versicherungen]"),
    ("Wie ist die Anfahrt zur Praxis?", "[Praxisinformationen: Anfahrt]"),
], ids=["ja-hours", "ja-parking", "ja-insurance", "ja-saturday", "ja-cancel", "ja-long-parking",
        "ja-wifi", "zh-hours", "zh-saturday", "zh-long-saturday", "zh-subway", "zh-wechat-pay",
        "ko-insurance", "ko-parking", "ko-long-parking", "ko-saturday", "en-hours", "en-children",
        "de-insurance", "de-directions"])
def test_a_question_in_each_language_gets_the_passage_that_answers_it(clinic, fake, question,
                                                                       section):
    passages = passages_for(clinic, fake, question)
    assert passages and passages[0].startswith(section), passages


def test_one_pair_in_common_does_not_bring_a_passage_beside_a_better_one(clinic, fake):
    passages = passages_for(clinic, fake, "診療時間は何時からですか？")
    assert passages[0].startswith("[診療案内: 診療時間]")
    assert not any(p.startswith("[診療案内: 保険]") for p in passages), \
        "the insurance passage shares only 診療 (in 自費診療) with the question"


@pytest.mark.parametrize("question", [
    "ペットを連れて行ってもいいですか", "クレジットカードで払えますか",
    "英語を話せるスタッフはいますか", "子供を連れて行っても大丈夫ですか", "歯が痛いです",
    "クリーニングにはどのくらい時間がかかりますか",  # 時間 alone, in a long question
    "你们有儿童牙科吗？", "可以带狗吗？", "电话号码是多少？", "洗牙需要多长时间？",
    "영어를 하는 직원이 있나요?", "강아지를 데려가도 되나요?", "예약을 바꾸고 싶어요",
    "검사 결과는 언제 나오나요?", "스케일링은 시간이 얼마나 걸리나요?",
    "그럼 다음 주에 다시 전화할게요",
    "Can I bring my dog?", "Сколько стоит чистка зубов?",
], ids=["ja-pets", "ja-credit-card", "ja-english", "ja-children", "ja-toothache", "ja-long-time",
        "zh-children", "zh-dog", "zh-phone", "zh-long-time", "ko-english", "ko-puppy",
        "ko-reschedule", "ko-results", "ko-long-time", "ko-call-back", "en-dog", "ru-cleaning"])
def test_a_question_the_documents_do_not_cover_gets_no_passage(clinic, fake, question):
    assert passages_for(clinic, fake, question) == []


@pytest.mark.parametrize("question", [
    "ですか", "はい、そうです", "ありがとうございます", "よろしくお願いします",
    "吗？", "好的，谢谢", "是的", "네, 감사합니다", "안녕하세요",
], ids=["ja-desuka", "ja-hai", "ja-thanks", "ja-yoroshiku", "zh-ma", "zh-thanks", "zh-yes",
        "ko-thanks", "ko-hello"])
def test_particles_endings_and_politeness_match_nothing(clinic, fake, question):
    assert passages_for(clinic, fake, question) == []


def test_a_document_added_while_the_server_runs_is_searched_in_pairs(start_server, fake, tmp_path):
    server = start_server("openai-advanced", KNOWLEDGE_DIR=str(tmp_path))
    question = "ペットを連れて行ってもいいですか"
    assert passages_for(server, fake, question) == []
    document = "# 診療案内\n\n## ペット\n盲導犬以外のペットはご遠慮ください。\n"
    (tmp_path / "pets.md").write_text(document, encoding="utf-8")

    def found():
        time.sleep(0.2)  # the folder is looked at once a second: a turn every 0.2 s is enough
        fake.reset()
        return passages_for(server, fake, question)
    passages = wait_for(found, 5)
    assert passages and passages[0].startswith("[診療案内: ペット]"), passages
