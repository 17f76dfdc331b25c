"""Built-in prompt sets and loaders for a user's own text.

A ``PromptSet`` is a named, labelled tuple of texts. Built-in sets (``get_prompts(name)``):

- ``diverse``: English prose from ~20 to ~450 tokens, Python source, LaTeX, French and
  German prose, and a list. All text was written for lensdyn.
- ``varied``: 21 prompts written for lensdyn apart from ``diverse`` (they share no 8-word run):
  English prose from one sentence (12 SmolLM2 tokens) to a passage of 1,043, a chat transcript and
  a play's lines, Python, JavaScript and Rust, a markdown and a CSV table, Spanish, Italian, Dutch
  and Polish prose, a list, an email, numbers with units, a poem, a recipe and a log. The passage
  is longer than a 512-token context (minilm-l6): there it is refused unless ``truncate=True``.
- ``repeated``: one token repeated. A collapse control: report it apart, never average it
  with real prompts.

``load_prompts(path)`` reads a ``.txt`` file (one prompt), a ``.jsonl`` file (one
``{"text": ...}`` per line), or a directory of ``.txt`` files (one prompt each, sorted by name).
``resolve_prompts(x)`` accepts any of these, a built-in name, a string, or a list of strings;
a string that nearly names a set or a path (``"diverse "``) is an error, not a one-prompt set.

Data owned by one analysis lives with it: the clean/edited prompt pairs for deflection and
patching are ``lensdyn.analyses.curvature.EDIT_PAIRS``; the contrastive texts for steering
vectors (``sentiment``, ``formality``) are ``lensdyn.analyses.steering.CONTRAST_SETS``
(``resolve_contrast``). Their names are listed here (``CONTRAST_SET_NAMES``) only so that a
prompt string naming one is refused with a pointer there, never run as a one-prompt set.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path

from lensdyn.errors import PromptError


@dataclass(frozen=True)
class PromptSet:
    """Named prompts. ``labels[i]`` names ``texts[i]`` in tables and figures."""

    name: str
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    def __post_init__(self):
        if not self.texts:
            raise PromptError(f"prompt set {self.name!r} is empty: give at least one prompt")
        if len(self.labels) != len(self.texts):
            raise PromptError(
                f"prompt set {self.name!r} has {len(self.texts)} texts but {len(self.labels)} labels"
            )
        for label, text in zip(self.labels, self.texts):
            if not isinstance(text, str) or not text.strip():
                raise PromptError(f"prompt {label!r} in set {self.name!r} is empty")

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def from_texts(cls, texts, name: str = "custom") -> "PromptSet":
        texts = tuple(texts)
        return cls(name=name, texts=texts, labels=tuple(f"{name}[{i}]" for i in range(len(texts))))


_SHORT = "The lighthouse keeper counted the ships at dawn, then wrote their names in a blue notebook."

_MEDIUM = (
    "Every spring the river below the mill rises with snowmelt from the hills. The miller's "
    "daughter keeps a chart on the kitchen wall: one line for each year, marking how far the "
    "water climbed up the stone steps. Most years it stops at the fourth step. Twice in her "
    "lifetime it reached the door, and both times the village carried sandbags through the night."
)

_LONG = (
    "When the observatory on the ridge was built, nobody expected it to become the busiest "
    "building in the valley. It had been meant for a handful of astronomers who would arrive in "
    "autumn, stay through the clear winter months, and leave again when the spring haze "
    "returned. Instead, the schoolteacher in the village below began bringing her class up the "
    "winding road every Thursday evening. The children took turns at the small refracting "
    "telescope, arguing about whether the smudge near the horizon was a galaxy or a cloud of dust. "
    "Soon their parents came too, carrying thermoses of soup and folding chairs, and the "
    "astronomers found themselves explaining the phases of Venus between their own observations. "
    "One of them, a quiet man who had spent a decade measuring the brightness of variable stars, "
    "started a notebook in which visitors could record what they saw. The entries were uneven: "
    "some were careful sketches of Saturn's rings, others simply said that the moon looked "
    "closer than it did from the bus stop. By the third winter the notebook had been replaced "
    "by a shelf of them, and a retired engineer from the village had volunteered to repair the "
    "dome's motor whenever it stalled in the cold."
)

_VERY_LONG = (
    _LONG
    + " The funding agency that paid for the observatory was puzzled by the reports it received. "
    "Its forms asked for the number of scientific papers, the hours of telescope time, and the "
    "fraction of nights lost to weather. They had no box for the number of children who now "
    "knew the names of the brightest stars, or for the farmer who had driven up one night to ask "
    "whether the light he kept seeing over his barn was a satellite. The director wrote long "
    "letters in the margins of the forms, describing the Thursday evenings, and the agency "
    "eventually sent an inspector. She arrived on a cloudy night, when nothing could be seen, "
    "and spent the evening in the library reading the visitors' notebooks instead. Her report "
    "recommended that the observatory's budget be renewed, and added, in a sentence that the "
    "staff later framed and hung beside the door, that an instrument is measured not only by "
    "what it sees but also by who is allowed to look through it. The following year the "
    "agency added a new line to its forms, asking how many members of the public had visited, "
    "and the director, for once, had an easy number to write."
)

_CODE = '''def moving_average(values, window):
    """Return the running mean of `values` over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    total = 0.0
    averages = []
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averages.append(total / min(i + 1, window))
    return averages


print(moving_average([3, 1, 4, 1, 5, 9, 2, 6], window=3))
'''

_LATEX = r"""\begin{theorem}
Let $f\colon [a,b] \to \mathbb{R}$ be continuous and differentiable on $(a,b)$. Then there
exists $c \in (a,b)$ such that
\[
  f'(c) = \frac{f(b) - f(a)}{b - a}.
\]
\end{theorem}
\begin{proof}
Define $g(x) = f(x) - \frac{f(b)-f(a)}{b-a}(x-a)$. Then $g(a) = g(b)$, and by Rolle's
theorem there is $c$ with $g'(c) = 0$, which is the claim.
\end{proof}"""

_FRENCH = (
    "Le boulanger du quartier ouvre sa boutique avant le lever du soleil. Pendant que la ville "
    "dort encore, il sort du four les premières baguettes et les pose sur des grilles pour "
    "qu'elles refroidissent. Les habitués savent qu'il faut arriver tôt : à huit heures, les "
    "croissants aux amandes ont déjà disparu."
)

_GERMAN = (
    "Im Herbst sammeln die Kinder Kastanien im Park und bauen daraus kleine Tiere mit "
    "Streichhölzern als Beinen. Am Abend stehen die Figuren in einer langen Reihe auf der "
    "Fensterbank, und jedes Kind behauptet, seine sei die schönste."
)

_LIST = """Packing list for the field trip:
1. Waterproof jacket
2. Two pairs of wool socks
3. Notebook and pencils
4. Reusable water bottle
5. Sandwiches for lunch
6. Binoculars (optional)
7. Signed permission slip"""

# The varied set: written for lensdyn independently of the diverse set above (no shared sentence;
# tests/test_prompt_sets.py checks 8-word shingles), to vary kind and length further.

_PASSAGE = (
    "The survey of the tidal flats began, as most things in the harbour town did, with an argument "
    "in the back room of the chandlery. The old chart on the wall showed three channels winding "
    "out through the mud towards open water, and every fisherman who came in for rope or paint had "
    "an opinion about which of them still existed. The eldest insisted that the northern channel had "
    "silted up before the war. A younger skipper swore she had taken her boat through it only last "
    "August, at the top of a spring tide, with a hand's breadth of water under the keel. The harbour "
    "master, who had to sign the notices that told visiting sailors where it was safe to go, listened "
    "to both of them for a week and then asked the council for money to find out.\n\n"
    "The council gave her enough for a small outboard, a borrowed echo sounder, and the wages of one "
    "assistant for a single summer. The assistant turned out to be Ilse, a geography student who had "
    "grown up inland and had never been in a boat smaller than a ferry. On her first morning she "
    "arrived with a rucksack full of notebooks, a waterproof watch, and a printed timetable of the "
    "tides, which she had annotated in three colours. The harbour master looked at the timetable, "
    "looked at the sky, and told her that the printed times were a good first guess and that the "
    "wind would decide the rest.\n\n"
    "They worked in the two hours either side of high water, when the flats disappeared under a "
    "skin of grey sea and the channels could be traced only by the numbers on the sounder's screen. "
    "Ilse steered along lines she had drawn the night before, calling out the depth every few "
    "seconds, while the harbour master wrote the readings against the time and the bearing of the "
    "church spire. When the tide turned they ran for the quay, because a boat caught on the mud at "
    "low water stays there for six hours, and the gulls have no pity for anyone sitting in it.\n\n"
    "By the middle of July the notebooks held several thousand soundings, and Ilse spent her "
    "evenings turning them into a map. The work was slower than she had expected. Every reading had "
    "to be corrected for the height of the tide at the moment it was taken, and the tide itself did "
    "not rise evenly: it crept in for the first hour, hurried through the middle of the flood, and "
    "slowed again near the top. She built a table of corrections from the gauge on the harbour wall, "
    "checked it against the published curve, and found that the two disagreed by almost twenty "
    "centimetres on windy days. After that she trusted the gauge.\n\n"
    "The map that emerged settled the argument in the chandlery, though not in the way anyone had "
    "predicted. The northern channel had not vanished; it had moved. Over forty years it had swung "
    "nearly three hundred metres to the east, cutting into a bank that the old chart showed as dry "
    "sand, and leaving its former bed as a shallow basin where cockles now grew. The eldest fisherman "
    "had been right that the channel on the chart was gone, and the young skipper had been right that "
    "there was still a way through. They had simply been talking about two different places with the "
    "same name.\n\n"
    "The middle channel, which everyone had assumed was the safest, proved to be the most worrying. "
    "Near its mouth the soundings showed a ridge of sand building across it, high enough at low water "
    "to ground anything larger than a dinghy. Nobody had noticed because the boats that used the "
    "channel were small and their owners knew to wait for the flood. A visiting yacht, following the "
    "old notices, would have had no such warning. The harbour master rewrote the notices that "
    "autumn, marking the ridge with a new buoy and adding a sentence advising strangers to call the "
    "harbour office before attempting the passage at any state of the tide below half.\n\n"
    "Ilse went back to university in September with a box of notebooks and the makings of a "
    "dissertation. She had intended to write about sediment transport, and she did, but the chapter "
    "her examiners remembered was the one about the arguments in the chandlery. In it she described "
    "how each fisherman's memory had been accurate for the years in which he had fished most often, "
    "and how the disagreements between them recorded the movement of the channels more faithfully "
    "than any chart the town possessed. The memories were a survey too, she wrote, only one taken "
    "slowly, by many people, without a single instrument.\n\n"
    "The following spring the council found money for a second season, and then for a third. The "
    "surveys became a habit, repeated every summer, and the map on the chandlery wall was replaced "
    "each year by a new one with the previous year's channels drawn faintly underneath. Visitors "
    "sometimes asked why the lines never stayed still. The owner of the chandlery would point to the "
    "ghostly traces of earlier years and explain that the flats were not a place so much as a slow "
    "conversation between the river and the sea, and that the map was simply the town's way of "
    "taking notes."
)

_CHAT = """[09:02] priya: morning all, is the staging server down for anyone else?
[09:03] ben: yep, 502 on every page since about 8:45
[09:03] priya: ok good, not just me then
[09:05] ben: looks like the disk filled up overnight, the log rotation job didn't run
[09:06] carla: that's my fault, I paused the cron jobs on friday for the migration and forgot to turn them back on
[09:06] carla: sorry!!
[09:07] ben: no worries. clearing the old logs now
[09:11] ben: back up. carla can you re-enable the jobs when you get a sec?
[09:12] carla: done, and I've added a reminder to the migration checklist
[09:12] priya: thanks both. standup in 20?"""

_PLAY = """HARRIET. You've left the gate open again.
OWEN. The goats prefer it open.
HARRIET. The goats are not the ones who have to chase them through the churchyard.
OWEN. (setting down the bucket) They came back on their own last time.
HARRIET. Last time they came back because the vicar brought them. In his car.
OWEN. He said he enjoyed the company.
HARRIET. He said it through his teeth, Owen.
(A bleat, offstage. They both turn towards it.)
OWEN. That'll be Marigold. She always goes first.
HARRIET. Then you can go second. I'll put the kettle on."""

_PYTHON = '''from dataclasses import dataclass


@dataclass
class Shelf:
    capacity: int
    items: list[str]

    def add(self, item: str) -> bool:
        """Put `item` on the shelf if there is room; say whether it fitted."""
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        return True


def parse_duration(text: str) -> int:
    """Seconds in a duration such as '1h30m' or '45s'."""
    units = {"h": 3600, "m": 60, "s": 1}
    total, digits = 0, ""
    for char in text:
        if char.isdigit():
            digits += char
        elif char in units and digits:
            total += int(digits) * units[char]
            digits = ""
        else:
            raise ValueError(f"bad duration: {text!r}")
    return total
'''

_JAVASCRIPT = """// Call `fn` only after `waitMs` milliseconds have passed without another call.
function debounce(fn, waitMs) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), waitMs);
  };
}

const search = document.querySelector("#search");
const results = document.querySelector("#results");

search.addEventListener(
  "input",
  debounce(async (event) => {
    const query = encodeURIComponent(event.target.value.trim());
    if (!query) {
      results.replaceChildren();
      return;
    }
    const response = await fetch(`/api/books?q=${query}`);
    const books = await response.json();
    results.replaceChildren(...books.map((b) => Object.assign(document.createElement("li"), { textContent: b.title })));
  }, 250)
);"""

_RUST = """use std::collections::HashMap;

/// Counts how often each word occurs, ignoring case and punctuation.
fn word_counts(text: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for word in text.split_whitespace() {
        let cleaned: String = word
            .chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect();
        if !cleaned.is_empty() {
            *counts.entry(cleaned).or_insert(0) += 1;
        }
    }
    counts
}

fn main() {
    let counts = word_counts("The cat saw the dog; the dog saw the cat.");
    let mut pairs: Vec<_> = counts.into_iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (word, n) in pairs {
        println!("{word}: {n}");
    }
}"""

_MARKDOWN_TABLE = """| Trail | Distance (km) | Ascent (m) | Difficulty | Dogs allowed |
|---|---:|---:|---|---|
| Heron Loop | 4.2 | 60 | easy | yes |
| Quarry Ridge | 9.8 | 410 | moderate | on lead |
| Old Post Road | 14.5 | 220 | moderate | yes |
| Falcon Crag | 7.1 | 690 | hard | no |
| Millpond Walk | 2.3 | 15 | easy | yes |"""

_CSV_TABLE = """station,date,temp_min_c,temp_max_c,rain_mm,wind_kmh
north_field,2024-03-01,1.4,9.8,0.0,12
north_field,2024-03-02,3.1,11.2,4.6,27
north_field,2024-03-03,2.7,8.5,12.3,35
river_gauge,2024-03-01,2.0,10.4,0.2,9
river_gauge,2024-03-02,3.8,12.0,5.1,22
river_gauge,2024-03-03,3.3,9.1,10.8,31
hill_top,2024-03-01,-1.2,6.3,0.0,18
hill_top,2024-03-02,0.4,7.9,6.0,41"""

_SPANISH = (
    "La conductora del autobús de la línea doce conoce a sus pasajeros por la parada en la que "
    "suben. A las siete sube el señor del paraguas verde, que nunca se sienta aunque haya sitio; a "
    "las siete y cuarto, dos estudiantes que repasan apuntes en voz baja. Cuando la carretera empieza "
    "a subir hacia el pueblo, ella reduce la marcha y avisa de que en la curva del puente suele haber "
    "niebla. Nadie se queja si llega tarde: en invierno, todos saben que la montaña decide el horario."
)

_ITALIAN = (
    "Ogni sabato mattina mio nonno apre la sua piccola bottega di orologi in fondo alla via. Sul "
    "bancone tiene una lente, un cacciavite sottilissimo e una scatola di latta piena di ingranaggi "
    "di cui nessuno ricorda più la provenienza. I clienti gli portano sveglie ferme da anni, orologi "
    "da taschino ereditati e, una volta, perfino un cucù che cantava soltanto di notte. Lui ascolta "
    "ogni meccanismo come se fosse un paziente, poi dice sempre la stessa cosa: «Torni martedì, "
    "vediamo che cosa mi racconta»."
)

_DUTCH = (
    "Wie in deze provincie fietst, leert al snel dat de wind nooit van achteren komt. 's Ochtends "
    "rijd je met tegenwind over de dijk naar school, en 's middags is de wind natuurlijk gedraaid. "
    "Mijn buurman beweert dat hij in veertig jaar precies drie keer wind mee heeft gehad, en dat hij "
    "alle drie de data nog weet. Op de dijk staan schapen die zich er niets van aantrekken; ze kijken "
    "de fietsers na alsof ze zich afvragen waarom iemand zoveel moeite doet."
)

_POLISH = (
    "Kiedy biblioteka miejska przeprowadzała się do nowego budynku, mieszkańcy postanowili pomóc. W "
    "sobotę rano ustawili się w długim szeregu od starych drzwi aż do nowych i podawali sobie książki "
    "z rąk do rąk. Dzieci liczyły tomy, a emerytowany nauczyciel pilnował, żeby żadna encyklopedia nie "
    "trafiła na półkę z powieściami. Wieczorem okazało się, że przeniesiono ponad dwanaście tysięcy "
    "książek i nie zgubiono ani jednej, choć jeden atlas znaleziono później w koszyku na pieczywo."
)

_TODO = """Before the move on Saturday:
- [x] Book the van (collect 8:00, return by 18:00)
- [x] Ask Dana to mind the cat
- [ ] Label every box with the room it goes to
- [ ] Defrost the freezer on Thursday night
- [ ] Take meter readings: gas, electricity, water
- [ ] Leave spare keys with the new tenants
- [ ] Redirect post to the new address"""

_EMAIL = """Subject: Rescheduling Thursday's review

Hi Marcus,

I'm sorry to do this at short notice, but I need to move our design review on Thursday. The test
rig is booked for a calibration run that afternoon and I'd like to be there when it finishes.

Would Friday at 10:30 work instead? If not, I'm free on Monday any time after lunch. I'll bring
the updated drawings either way, and I've attached the notes from last week so you can see which
questions are still open.

Thanks for your patience,
Aoife"""

_NUMBERS = (
    "The rainwater tank holds 2,400 L and fills at about 35 L per millimetre of rain on the 42 m² "
    "roof. A 12 V pump draws 4.5 A, so one hour of pumping uses 54 Wh. In March the garden needed "
    "roughly 18 L/m² per week over 65 m², which is 1,170 L a week, or a little under half the tank. "
    "At 0.3 bar the drip line delivers 2 L/h per emitter; with 120 emitters that is 240 L/h. For "
    "comparison: 1 US gallon = 3.785 L, 1 inch = 25.4 mm, and 20 °C = 68 °F."
)

_POEM = """Low tide, and the harbour shows its bones:
ribs of a hull, a chain, a scatter of stones.
The herons stand like question marks in rows,
and wait for something only water knows.
By noon the sea returns to hide the page,
and nothing on the flats will show its age."""

_RECIPE = """Lentil soup (serves 4)

250 g red lentils, rinsed
1 onion, 2 carrots and 2 celery sticks, diced
2 garlic cloves, crushed
1 tsp ground cumin, 1/2 tsp smoked paprika
1.2 litres vegetable stock
juice of half a lemon

1. Soften the onion, carrot and celery in a little oil for 8 minutes.
2. Add the garlic and spices and stir for 1 minute.
3. Add the lentils and stock, bring to the boil, then simmer for 20-25 minutes.
4. Blend half the soup, stir it back in, season and add the lemon juice."""

_LOG = """2024-05-14T03:12:07Z INFO  backup: starting nightly snapshot of /srv/data (412 GiB)
2024-05-14T03:12:09Z INFO  backup: 18,204 files changed since last snapshot
2024-05-14T03:41:55Z WARN  backup: read retry on /srv/data/photos/2019/IMG_4471.jpg (attempt 2/5)
2024-05-14T03:41:56Z INFO  backup: read succeeded after retry
2024-05-14T04:03:30Z INFO  backup: uploaded 37.8 GiB in 51m21s (12.6 MiB/s)
2024-05-14T04:03:31Z ERROR prune: could not remove snapshot 2024-04-13: lock held by pid 2291
2024-05-14T04:03:31Z INFO  backup: finished with 1 error; next run 2024-05-15T03:12:00Z"""

_VARIED_ITEMS = (
    ("prose-short", "Rain had softened the chalk lines on the playground by noon."),
    ("prose-medium", (
        "The courier knew the city by its hills rather than its streets. Going north meant a long "
        "climb past the hospital, so she saved those deliveries for the afternoon, when the wind "
        "usually came from the river and pushed her up the slope. Her notebook held no addresses, "
        "only sketches of doorways: a blue one with a brass fox, a shop with a broken bell."
    )),
    ("prose-long", (
        "The seed library started in a shoebox on the counter of the post office. A retired "
        "teacher had saved beans from her garden for thirty years, and one winter she decided she "
        "had more than any one person could plant. She wrote the name of each variety on a paper "
        "envelope, added a line about when to sow it and how tall it grew, and left a note inviting "
        "people to take what they liked and return a few seeds at the end of the season. At first "
        "only her neighbours borrowed anything. By the second spring the shoebox had become a chest "
        "of small drawers, donated by a carpenter who wanted somewhere to keep his grandmother's "
        "tomatoes, and the post office had started a waiting list for the rarest squash. Not every "
        "envelope came back. Some gardeners forgot, some harvests failed, and one summer a flood "
        "took half the allotments by the river. But enough seeds returned, often with notes about "
        "what had grown well in a shady yard or a windy balcony, that the collection kept getting "
        "larger. The teacher said that was the point: a seed kept in a drawer only remembers one "
        "garden, while a seed passed around learns the whole town."
    )),
    ("prose-passage", _PASSAGE),
    ("dialogue-chat", _CHAT),
    ("dialogue-play", _PLAY),
    ("code-python", _PYTHON),
    ("code-javascript", _JAVASCRIPT),
    ("code-rust", _RUST),
    ("table-markdown", _MARKDOWN_TABLE),
    ("table-csv", _CSV_TABLE),
    ("spanish", _SPANISH),
    ("italian", _ITALIAN),
    ("dutch", _DUTCH),
    ("polish", _POLISH),
    ("list", _TODO),
    ("email", _EMAIL),
    ("numbers-units", _NUMBERS),
    ("poem", _POEM),
    ("recipe", _RECIPE),
    ("log", _LOG),
)

_BUILTIN: dict[str, PromptSet] = {
    "diverse": PromptSet(
        name="diverse",
        texts=(_SHORT, _MEDIUM, _LONG, _VERY_LONG, _CODE, _LATEX, _FRENCH, _GERMAN, _LIST),
        labels=(
            "prose-short",
            "prose-medium",
            "prose-long",
            "prose-very-long",
            "python",
            "latex",
            "french",
            "german",
            "list",
        ),
    ),
    "varied": PromptSet(
        name="varied",
        texts=tuple(text for _, text in _VARIED_ITEMS),
        labels=tuple(label for label, _ in _VARIED_ITEMS),
    ),
    "repeated": PromptSet(
        name="repeated",
        texts=(" the" * 128, " A" * 64),
        labels=("repeated-the-128", "repeated-A-64"),
    ),
}

BUILTIN_PROMPT_SETS = tuple(_BUILTIN)

# The names of lensdyn.analyses.steering.CONTRAST_SETS. The core imports no analysis, so they are listed
# here, for the hints of resolve_prompts; tests/test_steering.py checks that they are exactly steering's.
CONTRAST_SET_NAMES = ("sentiment", "formality")


def get_prompts(name: str) -> PromptSet:
    """A built-in prompt set by name (``"diverse"``, ``"varied"`` or ``"repeated"``)."""
    try:
        return _BUILTIN[name]
    except KeyError:
        raise PromptError(
            f"unknown prompt set {name!r}: built-in sets are {', '.join(_BUILTIN)}; "
            "or give a .txt/.jsonl file or a directory of .txt files"
        ) from None


def _read_text(path: Path) -> str:
    """A prompt file's text; a file that is not UTF-8 is a ``PromptError`` naming it, not a traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise PromptError(f"{path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from None


def load_prompts(path: str | Path) -> PromptSet:
    """Read prompts from a ``.txt`` file, a ``.jsonl`` file, or a directory of ``.txt`` files."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise PromptError(f"directory {path} holds no .txt files")
        texts = tuple(_read_text(f) for f in files)
        return PromptSet(name=path.name, texts=texts, labels=tuple(f.stem for f in files))
    if not path.is_file():
        raise PromptError(f"no such prompt file or directory: {path}")
    if path.suffix == ".jsonl":
        texts, labels = [], []
        for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                texts.append(record["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PromptError(f'{path}:{line_no}: expected a JSON object with a "text" field') from None
            labels.append(str(record.get("label", f"{path.stem}[{len(labels)}]")))
        if not texts:
            raise PromptError(f"{path} holds no prompts")
        return PromptSet(name=path.stem, texts=tuple(texts), labels=tuple(labels))
    return PromptSet(name=path.stem, texts=(_read_text(path),), labels=(path.stem,))


def resolve_prompts(prompts, *, allow_literal: bool = True) -> PromptSet:
    """Turn what a user passes (a PromptSet, built-in name, path, string or list of strings) into a PromptSet.

    A string is a built-in set name or a path only when it is exactly one. A string that nearly
    is one (``"diverse "``, ``"divers"``, a missing ``"my.txt"``) is an error that says so, and an
    empty string is an empty prompt, never the current directory. Any other string is itself the
    one prompt, unless ``allow_literal=False`` (the CLI), where it is an error too: a mistyped set
    name must not silently become a one-prompt experiment. A list of strings is always prompts.
    """
    if isinstance(prompts, PromptSet):
        return prompts
    if isinstance(prompts, Path):
        return load_prompts(prompts)
    if isinstance(prompts, str):
        return _resolve_string(prompts, allow_literal)
    if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
        if not prompts:
            raise PromptError("empty prompt list: give at least one prompt")
        return PromptSet.from_texts(prompts)
    raise PromptError(
        f"cannot read prompts from {type(prompts).__name__}: give a PromptSet, a built-in name "
        f"({', '.join(_BUILTIN)}), a path, a string, or a list of strings"
    )


# Endings of the files load_prompts reads: a one-word string with one is meant as a path.
_PROMPT_FILE_SUFFIXES = (".txt", ".jsonl")


def _resolve_string(text: str, allow_literal: bool) -> PromptSet:
    """A built-in set, a prompt file or directory, or the one literal prompt ``text``; never a guess."""
    if not text.strip():
        # Path("") is the current directory: an empty string would read whatever .txt files lie there.
        raise PromptError(f"empty prompt {json.dumps(text)}: give a prompt text, a built-in set "
                          f"({', '.join(_BUILTIN)}), or a path")
    if text in _BUILTIN:
        return _BUILTIN[text]
    if _is_existing_path(text):
        return load_prompts(text)
    near = _near_name(text)
    if near is not None or _looks_like_a_path(text):
        raise PromptError(_not_a_name(text, near, allow_literal))
    if not allow_literal:
        get_prompts(text)  # raises, naming the built-in sets
    return PromptSet.from_texts([text])


def _is_existing_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # longer than a file name can be, or a NUL byte: a prompt, not a path
        return False


def _near_name(text: str) -> str | None:
    """The built-in set, contrast set or existing path ``text`` nearly names: other case, stray spaces, a typo."""
    key = text.strip()
    if key != text and (key in _BUILTIN or _is_existing_path(key)):
        return key
    names = {name.casefold(): name for name in (*_BUILTIN, *CONTRAST_SET_NAMES)}
    close = difflib.get_close_matches(key.casefold(), names, n=1, cutoff=0.8)
    return names[close[0]] if close else None


def _looks_like_a_path(text: str) -> bool:
    """One word with a directory separator, a leading ``~``, or a prompt file's ending."""
    if len(text.split()) != 1:
        return False
    word = text.strip()
    return "/" in word or "\\" in word or word.startswith("~") or word.lower().endswith(_PROMPT_FILE_SUFFIXES)


def _not_a_name(text: str, near: str | None, allow_literal: bool) -> str:
    """What was understood of a string that nearly names a set or path, and what to give instead."""
    quote = (lambda s: json.dumps(s, ensure_ascii=False)) if allow_literal else repr
    if near in CONTRAST_SET_NAMES and near == text.strip():
        hint = " (it is a contrast set, for steering: resolve_contrast)"
    elif near in CONTRAST_SET_NAMES:
        hint = f" (did you mean the contrast set {quote(near)}? contrast sets are for steering: resolve_contrast)"
    else:
        hint = f" (did you mean {quote(near)}?)" if near is not None else ""
    if allow_literal:
        return f"no built-in set or path named {quote(text)}{hint}; to pass one prompt, give a list: [{quote(text)}]"
    # The CLI's wording, as get_prompts words it: a command line cannot pass a list.
    return (f"unknown prompt set {text!r}{hint}: built-in sets are {', '.join(_BUILTIN)}; "
            "or give a .txt/.jsonl file or a directory of .txt files")
