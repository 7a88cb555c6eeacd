"""The texts of `clusterfx bench quality`: 48 passages written for this benchmark (16 of
about 130-250 tokens, 16 of 250-380 and 16 of 380-500 after WordPiece tokenisation), and 24
short queries, each a paraphrase of one passage, for a retrieval check.

Whitespace in the texts is collapsed to single spaces when the module is imported.
"""

from __future__ import annotations

from typing import NamedTuple


class Passage(NamedTuple):
    topic: str
    title: str
    text: str


class Query(NamedTuple):
    text: str
    passage: int  # index into PASSAGES of the passage it paraphrases


_PASSAGES = (
    ('finance', 'Compound interest', """
Compound interest is interest calculated not only on the original amount of money but also on
the interest that has already been added to it. If you deposit one thousand pounds at five
percent a year, after the first year you have one thousand and fifty; in the second year you
earn interest on the full one thousand and fifty, and so on. Over long periods this produces
exponential growth, which is why starting to save early matters so much more than the size of
individual contributions. A handy estimate called the rule of 72 says that dividing 72 by the
annual interest rate gives roughly the number of years it takes for money to double. The same
mechanism works against borrowers who leave their debts unpaid.
"""),
    ('literature', 'Haiku', """
The haiku is a short form of Japanese poetry that traditionally consists of seventeen sound
units arranged in three phrases of five, seven and five. It developed from the opening verse of
longer collaborative poems and became an independent art form in the seventeenth century, above
all through the work of Matsuo Basho, whose poem about an old pond and a frog jumping into the
water is probably the most famous haiku ever written. Classical haiku contain a seasonal
reference, called a kigo, and a cutting word that creates a pause or contrast between two
images. The form values plain description and sudden insight over explanation or metaphor. Later
masters such as Yosa Buson and Kobayashi Issa continued the tradition.
"""),
    ('law', 'Habeas corpus', """
Habeas corpus is a legal remedy that protects people against unlawful detention. The Latin
phrase means roughly "you shall have the body", and the writ orders whoever is holding a
prisoner to bring that person before a court and justify the detention. If the jailer cannot
show a lawful reason, the judge must order the prisoner's release. The principle grew out of
English common law and was strengthened by the Habeas Corpus Act of 1679, passed to stop the
Crown from imprisoning critics without trial. It later spread to the legal systems of many
former British colonies, and the United States Constitution says that the privilege of the writ
may only be suspended in cases of rebellion or invasion when public safety requires it.
"""),
    ('sport', 'Tapering before a marathon', """
Marathon runners usually follow a training plan of sixteen to twenty weeks that gradually builds
weekly mileage and includes one long run each week, reaching twenty miles or more a month before
the race. In the final two or three weeks, they taper: they cut their total distance sharply,
often by forty to sixty percent, while keeping some short faster sessions so their legs stay
sharp. The taper gives muscles time to repair microscopic damage, allows glycogen stores to fill
completely and lets hormone levels settle after months of hard work. Many runners find this
period mentally difficult, feeling sluggish or worrying that they are losing fitness, but
studies consistently show that a proper taper improves race performance by a few percent. In the
last days, athletes also increase their carbohydrate intake, and on race morning they eat a
familiar, easily digested breakfast.
"""),
    ('cooking', 'Keeping a sourdough starter', """
A sourdough starter is a living culture of wild yeast and lactic acid bacteria kept in a simple
mixture of flour and water. To begin one, a baker stirs equal weights of wholemeal flour and
lukewarm water in a jar, covers it loosely and leaves it at room temperature. Every day, most of
the mixture is discarded and the rest is fed with fresh flour and water. After about a week the
culture becomes reliably active: it doubles in volume within a few hours of feeding, smells
pleasantly sour and is full of bubbles. The yeast makes the dough rise, while the bacteria
produce lactic and acetic acids that give the bread its tangy flavour and help it keep longer. A
mature starter can live for decades if it is fed regularly, and many bakeries proudly claim that
theirs is older than the staff who tend it.
"""),
    ('music', 'The fugue', """
A fugue is a piece of contrapuntal music in which a short melody, called the subject, is
introduced by one voice and then imitated by others entering one after another. In the opening
section, the exposition, each voice states the subject in turn, often alternating between the
home key and the key a fifth higher, while the voices that have already entered continue with a
countersubject or free counterpoint. After the exposition, the composer develops the material in
episodes that modulate to related keys, and brings the subject back in new combinations,
sometimes overlapping entries in a dense passage known as a stretto. Johann Sebastian Bach is
regarded as the great master of the form; his Well-Tempered Clavier contains a prelude and fugue
in every major and minor key, and The Art of Fugue explores a single subject in a long series of
increasingly elaborate pieces.
"""),
    ('programming', 'Python list comprehensions', """
A list comprehension is a compact way to build a new list in Python from an existing iterable.
Instead of writing a loop that creates an empty list and appends to it, a programmer can write
the expression, the loop and an optional condition inside a single pair of square brackets. For
instance, squares of the even numbers below ten can be produced in one short line, which reads
almost like the mathematical notation for a set. Comprehensions are usually faster than the
equivalent explicit loop because the interpreter handles the appending internally. The same
syntax exists for dictionaries and sets, using curly braces, and a version with round brackets
creates a generator that yields items lazily instead of building the whole list in memory. Style
guides warn against nesting several comprehensions or packing complex logic into them, because a
clever one-liner can quickly become harder to read than a plain loop.
"""),
    ('science', 'Plate tectonics', """
The theory of plate tectonics explains that the Earth's rigid outer shell, the lithosphere, is
broken into a dozen or so large plates that slowly move over the hotter, softer mantle beneath.
They travel a few centimetres a year, roughly as fast as fingernails grow. Where plates pull
apart, as along the Mid-Atlantic Ridge, magma rises to create new ocean floor. Where they
collide, one plate may sink beneath another in a subduction zone, producing deep ocean trenches
and chains of volcanoes, or two continents may crumple together to raise mountain ranges such as
the Himalayas. Where plates slide past each other, as along the San Andreas Fault, stress builds
up and is released in earthquakes. The idea grew from Alfred Wegener's proposal of continental
drift in 1912, which was widely rejected until evidence of sea-floor spreading was found in the
1960s.
"""),
    ('science', 'The honeybee waggle dance', """
Honeybees share the location of good food sources through a remarkable behaviour called the
waggle dance. A forager returning to the hive performs a figure-of-eight on the vertical
honeycomb. During the straight middle run she waggles her abdomen from side to side, and the
angle of that run relative to vertical tells her nestmates the direction of the flowers relative
to the sun. The duration of the waggle run encodes the distance: the longer she waggles, the
farther away the food is. Other bees follow the dancer closely, pick up the scent of the flowers
on her body and then fly out to find them. The Austrian scientist Karl von Frisch decoded this
language in the mid-twentieth century and shared the 1973 Nobel Prize in Physiology or Medicine
for the work. Bees even adjust the angle over the course of the day to account for the movement
of the sun.
"""),
    ('sport', 'The offside rule in football', """
The offside rule is one of the most argued-about laws of association football. A player is in an
offside position if, at the moment a teammate plays the ball, any part of the head, body or feet
that can legally score is nearer to the opponents' goal line than both the ball and the
second-to-last defender. Being in that position is not an offence by itself; the player is only
penalised if they become involved in active play, for example by touching the ball, blocking a
defender's line of sight or gaining an advantage from a rebound. A player cannot be offside in
their own half, or when receiving the ball directly from a throw-in, goal kick or corner kick.
The rule exists to stop attackers from simply waiting beside the goalkeeper. Since the arrival
of video assistant referees, marginal decisions are measured with drawn lines, which has made
the rule more precise but also more controversial.
"""),
    ('medicine', 'Insulin and type 1 diabetes', """
Type 1 diabetes is an autoimmune disease in which the immune system destroys the beta cells of
the pancreas that produce insulin. Insulin is the hormone that lets cells take up glucose from
the blood, so without it blood sugar rises to dangerous levels while the body's tissues starve
for fuel. Untreated, the condition leads to weight loss, extreme thirst, frequent urination and
eventually diabetic ketoacidosis, which can be fatal. Before 1922 a diagnosis was effectively a
death sentence. That year Frederick Banting, Charles Best and their colleagues in Toronto
extracted insulin from animal pancreases and used it to save a dying teenager, Leonard Thompson.
Today patients inject synthetic human insulin or use pumps that deliver it continuously, and
continuous glucose monitors measure their blood sugar every few minutes. Researchers are now
testing transplants of lab-grown beta cells that might one day free patients from daily
injections.
"""),
    ('cooking', 'Pulling a shot of espresso', """
Espresso is made by forcing hot water at about nine bars of pressure through a compact puck of
finely ground coffee. A typical double shot uses around eighteen grams of coffee to produce
about thirty-six grams of liquid in twenty-five to thirty seconds. The grind size is the
barista's main control: if the grind is too coarse, water rushes through, extracting too little,
and the coffee tastes sour and thin; if it is too fine, the flow chokes, too much is extracted
and the result is bitter and harsh. Water temperature, usually around ninety-three degrees
Celsius, and even tamping matter too, because uneven pressure lets water channel through weak
spots in the puck. A well-made shot is topped with crema, a reddish-brown foam formed from
coffee oils and carbon dioxide, and it serves as the base for drinks such as cappuccinos, flat
whites and lattes.
"""),
    ('finance', 'Supply, demand and prices', """
In a market economy, prices are set by the interaction of supply and demand. The demand curve
shows how much of a good buyers are willing to purchase at each price; usually people buy less
as the price rises. The supply curve shows how much producers are willing to sell, and generally
they offer more when the price is higher, because production becomes more profitable. Where the
two curves cross is the equilibrium, the price at which the quantity demanded equals the
quantity supplied. If the price is above equilibrium, unsold stock piles up and sellers cut
prices; if it is below, shortages appear and prices are bid up. Shifts in either curve move the
equilibrium: a frost that destroys part of the orange harvest reduces supply and raises the
price of orange juice, while a fashion trend can increase demand for a particular kind of shoe.
Economists also study elasticity, which measures how strongly quantity responds to price. Demand
for necessities such as fuel or medicine tends to be inelastic, so price increases barely reduce
consumption, while demand for luxury goods is more elastic.
"""),
    ('programming', 'Garbage collection', """
Garbage collection is the automatic reclamation of memory that a program no longer uses. In
languages such as C, the programmer must explicitly free every block of memory, and mistakes
lead to leaks or to crashes when memory is used after being freed. Garbage-collected languages
such as Java, Go, C# and Python relieve the programmer of this work. The simplest technique is
reference counting, where each object records how many references point to it and is freed when
the count drops to zero; this is prompt and predictable but cannot reclaim cycles of objects
that refer to one another. Tracing collectors instead start from roots, such as global variables
and the stack, mark every object reachable from them and then sweep away everything else. Modern
collectors are generational, exploiting the observation that most objects die young: new objects
are allocated in a small nursery that is collected frequently and cheaply, and survivors are
promoted to an older generation that is scanned less often. Concurrent collectors do much of
their work while the program keeps running, reducing the pauses that can make applications
stutter, although they cost extra processor time and memory.
"""),
    ('science', 'Black holes', """
A black hole is a region of space where gravity is so strong that nothing, not even light, can
escape from it. Black holes form when a massive star runs out of nuclear fuel and its core
collapses under its own weight. The boundary around a black hole beyond which escape is
impossible is called the event horizon; its radius, the Schwarzschild radius, is proportional to
the mass, so a black hole with the mass of the Sun would be only about three kilometres across.
Near the horizon, time runs slower for an observer far away, and objects falling in are
stretched by tidal forces. Although black holes cannot be seen directly, they reveal themselves
through their effects on their surroundings. Gas spiralling into them forms hot accretion discs
that shine brightly in X-rays, and stars orbiting the centre of our galaxy show that it hosts a
black hole of about four million solar masses. In 2015 the LIGO detectors recorded gravitational
waves from two merging black holes, and in 2019 the Event Horizon Telescope released the first
image of the shadow of a supermassive black hole in the galaxy M87.
"""),
    ('games', 'Chess openings', """
The opening is the first phase of a chess game, usually the first ten to fifteen moves, during
which both players bring their pieces into play. A few principles guide good opening play:
control the centre of the board with pawns and pieces, develop knights and bishops quickly,
castle early to protect the king, and avoid moving the same piece several times without reason.
Over centuries, players have analysed popular sequences of moves in great depth and given them
names. The Ruy Lopez, named after a sixteenth-century Spanish priest, begins with the king's
pawn advanced two squares and puts early pressure on Black's knight. The Sicilian Defence, in
which Black answers the king's pawn with the c-pawn, leads to sharp, unbalanced positions and is
the most popular reply at the top level. The Queen's Gambit offers a pawn to divert Black's
central pawn. Modern professionals prepare openings with computer engines and databases of
millions of games, sometimes memorising twenty or more moves of analysis, so much of the
creative battle now begins only when one player leaves known theory.
"""),
    ('science', 'Photosynthesis', """
Photosynthesis is the process by which green plants, algae and some bacteria turn light into
chemical energy. Inside the chloroplasts, the pigment chlorophyll absorbs mostly red and blue
light and reflects green, which is why leaves look green to us. In the light-dependent
reactions, water molecules are split, releasing oxygen as a by-product and producing the energy
carriers ATP and NADPH. These carriers then power the Calvin cycle, a series of reactions in the
stroma where the enzyme RuBisCO fixes carbon dioxide from the air into three-carbon sugars.
Those sugars are later assembled into glucose, starch and cellulose. Almost every food chain on
Earth depends on this process, and the oxygen in the atmosphere that animals breathe was put
there over billions of years by photosynthetic organisms, beginning with ancient cyanobacteria
in the oceans. Not all plants fix carbon in the same way. In hot, dry climates, plants such as
maize and sugar cane use the C4 pathway, which concentrates carbon dioxide around RuBisCO and
limits wasteful reactions with oxygen, while cacti and pineapples open their pores only at night
to save water. Scientists are even trying to engineer crops with more efficient photosynthesis
to raise yields.
"""),
    ('history', 'Gutenberg and the printing press', """
Around 1440, the goldsmith Johannes Gutenberg of Mainz developed a printing system that
transformed European society. His key invention was a hand mould for casting large numbers of
identical metal letters, combined with an oil-based ink that stuck to metal and a press adapted
from the screw presses used for wine and olive oil. Individual letters could be arranged into
pages, printed hundreds of times and then reused. The Gutenberg Bible, finished around 1455,
showed that printed books could rival the beauty of manuscripts. Within fifty years, printing
shops had spread to more than two hundred European cities and produced millions of books.
Cheaper books encouraged literacy, helped scientists share exact copies of their results and
allowed the ideas of the Protestant Reformation to spread far faster than church authorities
could suppress them. Gutenberg himself profited little from the invention. He had borrowed
heavily from the merchant Johann Fust to finance his workshop, and after a lawsuit in 1455 Fust
took over much of the equipment and the work in progress, going on to run a successful printing
business with Gutenberg's former assistant Peter Schoeffer. Gutenberg died in 1468 in modest
circumstances, and much of what is known about his life comes from legal records rather than
from his own hand. Historians often rank his press among the most influential inventions of the
second millennium.
"""),
    ('science', 'Why the tides rise and fall', """
Ocean tides are caused mainly by the gravitational pull of the Moon, with a smaller contribution
from the Sun. Because gravity weakens with distance, the Moon pulls more strongly on the side of
the Earth facing it than on the Earth's centre, and more strongly on the centre than on the far
side. This difference stretches the oceans into two bulges, one facing the Moon and one on the
opposite side. As the Earth rotates through these bulges, most coasts see two high tides and two
low tides roughly every twenty-four hours and fifty minutes. When the Sun and Moon line up at
new and full moon, their effects add together to produce especially large spring tides; when
they are at right angles, the smaller neap tides result. The shape of coastlines and the sea
floor can greatly amplify the range, as in the Bay of Fundy, where the water rises by more than
fifteen metres. Tides matter to many human activities. Ports schedule the arrival of large ships
around high water, fishers and shellfish gatherers plan their work around the tide tables, and
the wide tidal flats exposed at low water feed enormous numbers of migrating birds. Because the
movement of the water is entirely predictable years in advance, engineers have built tidal power
stations, such as the barrage at La Rance in France, which has generated electricity since 1966.
Tidal friction also slowly brakes the Earth's rotation, lengthening the day by a couple of
milliseconds per century.
"""),
    ('programming', 'Branching in Git', """
Git is a distributed version control system, and its lightweight branches are central to how
teams use it. A branch is simply a movable pointer to a commit, so creating one is almost
instant and costs almost no storage. Developers typically create a new branch for each feature
or bug fix, commit their changes there and keep the main branch stable. When the work is ready,
it is combined back through a merge, which creates a commit with two parents, or through a
rebase, which replays the branch's commits on top of the latest main branch to produce a
straight history. If both sides changed the same lines, Git reports a conflict and asks the
developer to choose the correct result. Hosting services build code review around this model: a
pull request proposes merging one branch into another, lets colleagues comment on the changes
and runs automated tests before anything is accepted. Teams adopt different branching
strategies. Some keep long-lived development and release branches, while others practise
trunk-based development, merging small changes into the main branch several times a day behind
feature flags. Whatever the strategy, good practice is to keep branches short-lived, because the
longer a branch diverges from the main line, the more painful its eventual merge tends to be.
Tags, which are fixed pointers, mark released versions so that they can always be rebuilt
exactly.
"""),
    ('history', 'Causes of the French Revolution', """
The French Revolution of 1789 grew out of a combination of financial crisis, social resentment
and new political ideas. By the late 1780s the French monarchy was close to bankruptcy. It had
borrowed heavily to fight a series of wars, including its costly support for the American
colonists against Britain, and interest payments consumed about half of the royal budget. The
tax system made matters worse: the clergy and nobility, the First and Second Estates, were
largely exempt, so the burden fell on the Third Estate, which included peasants, urban workers
and the growing middle class of merchants and lawyers. Poor harvests in 1788 sent the price of
bread soaring, and many families spent most of their income on food. At the same time, the
writers of the Enlightenment, such as Rousseau, Voltaire and Montesquieu, had spread the idea
that government should rest on reason and the consent of the governed rather than on tradition
and divine right. When King Louis XVI summoned the Estates-General to approve new taxes, the
deputies of the Third Estate declared themselves a National Assembly and swore not to disband
until France had a constitution. The storming of the Bastille in July 1789 turned this political
confrontation into a popular uprising that would eventually abolish the monarchy. Historians
still debate how much weight to give each cause. Marxist historians of the twentieth century
described a class struggle in which the rising bourgeoisie overthrew a feudal aristocracy, while
later revisionists pointed out that many nobles and bourgeois shared the same wealth, education
and reforming ideas, and argued that the crisis was above all political.
"""),
    ('medicine', 'Antibiotic resistance', """
Antibiotics are among the most important medicines ever discovered, but their effectiveness is
steadily being eroded by resistance. Bacteria reproduce quickly, and random mutations
occasionally give an individual cell the ability to survive a drug, for example by pumping it
out, breaking it down with an enzyme or changing the molecule the drug normally binds to. When
an antibiotic kills the susceptible bacteria, the resistant ones are left to multiply, so every
course of treatment applies selective pressure. Bacteria can also swap resistance genes with one
another on small circles of DNA called plasmids, even across different species, which lets
resistance spread far faster than mutation alone would allow. Overuse makes the problem worse:
antibiotics are often prescribed for viral infections such as colds, on which they have no
effect, and large quantities are given to farm animals to promote growth. Hospitals are
hotspots, since they concentrate vulnerable patients and heavy antibiotic use in one place.
Infections caused by organisms such as methicillin-resistant Staphylococcus aureus or
carbapenem-resistant Enterobacteriaceae are now hard to treat, and public health agencies warn
that routine surgery and chemotherapy could become far more dangerous if effective antibiotics
run out. Responses include stewardship programmes that limit unnecessary prescriptions, better
infection control and incentives for companies to develop new classes of drugs. Researchers are
also reviving older ideas, such as phage therapy, which uses viruses that infect only bacteria,
and testing whether machine learning can help screen millions of molecules for antibacterial
activity. Because resistant bacteria travel with people, food and animals across borders, the
World Health Organization treats the problem as a global threat that no single country can solve
alone.
"""),
    ('science', 'CRISPR gene editing', """
CRISPR-Cas9 is a gene-editing tool adapted from an immune system that bacteria use to defend
themselves against viruses. Bacteria store short fragments of viral DNA in their own genome, in
regions of clustered regularly interspaced short palindromic repeats, which gave the system its
name. When the same virus attacks again, the cell produces RNA copies of those fragments, and a
protein called Cas9 uses them as guides to find and cut the matching viral DNA. In 2012 Jennifer
Doudna and Emmanuelle Charpentier showed that this machinery could be reprogrammed: by supplying
a synthetic guide RNA, researchers can direct Cas9 to cut almost any chosen sequence in any
organism. When the cell repairs the break, genes can be disabled, corrected or replaced. The
method is far cheaper and faster than earlier techniques, and within a few years it had spread
to laboratories worldwide. It is used to create disease models in animals, to engineer crops
that resist drought or disease, and in medicine, where the first approved CRISPR therapy treats
sickle cell disease by editing patients' own blood stem cells. Doudna and Charpentier received
the Nobel Prize in Chemistry in 2020. The technology also raises serious ethical questions,
especially after a scientist announced in 2018 that he had edited the genomes of human embryos
that were carried to birth. Most scientists support a pause on heritable changes of this kind,
since edits to embryos would be passed to future generations and their long-term effects cannot
yet be predicted. Newer variants of the technique, called base editing and prime editing, can
change single letters of DNA without cutting both strands, which promises greater precision and
fewer unintended changes elsewhere in the genome.
"""),
    ('law', 'Forming a contract', """
Under the common law, a legally binding contract generally requires several elements. First
there must be an offer, a clear statement of the terms on which one party is willing to be
bound. An advertisement or a price tag in a shop window is usually treated not as an offer but
as an invitation to treat, which invites customers to make offers of their own. Second, there
must be acceptance: an unconditional agreement to the terms of the offer. If the reply changes
the terms, it is a counter-offer, which rejects the original offer and replaces it. Third, there
must be consideration, meaning that each side gives something of value in return for the other's
promise, whether money, goods, services or a promise to act or not to act. Consideration need
not be adequate, so a house can be sold for a peppercorn, but it must have some value. Finally,
the parties must intend to create legal relations, which courts presume in commercial deals but
not in ordinary domestic arrangements between family members. The parties must also have
capacity; contracts with minors or people who lack mental capacity may be voidable. Some
contracts, such as those for the sale of land, must also be made in writing. When one party
fails to perform, the usual remedy is damages, an award of money intended to put the innocent
party in the position they would have been in had the contract been performed.
"""),
    ('music', 'Bebop and jazz improvisation', """
Bebop emerged in New York in the early 1940s, when young musicians such as Charlie Parker, Dizzy
Gillespie and Thelonious Monk began experimenting in late-night jam sessions at clubs like
Minton's Playhouse. Reacting against the polished arrangements of the big swing bands that
played for dancers, they favoured small groups, very fast tempos and complex harmony. A typical
bebop performance states a tricky, angular melody called the head, then each soloist improvises
over the chord changes for several choruses before the head returns at the end. Players often
borrowed the chord progressions of popular songs and wrote new melodies over them. Improvisers
used extended chords, chromatic passing notes and substitutions such as replacing a dominant
chord with one a tritone away, which gave the music its restless, unpredictable sound. Drummers
moved the steady pulse to the ride cymbal and used the bass drum for sudden accents. At first
many critics and older musicians dismissed the style as chaotic, but it became the foundation of
modern jazz, and learning to improvise over bebop changes is still a central part of jazz
education. Parker's recordings with Gillespie in 1945, such as Ko-Ko and Salt Peanuts,
circulated among young players who slowed the records down to learn the solos note by note. The
next generation, including Miles Davis, who played in Parker's quintet as a teenager, went on to
develop cool jazz, hard bop and modal jazz from these foundations.
"""),
    ('cooking', 'Making kimchi', """
Kimchi is the fermented vegetable dish at the heart of Korean cuisine, served at nearly every
meal. The most familiar version is made from napa cabbage. The cabbage is cut lengthwise, salted
generously between the leaves and left for several hours, which draws out water, softens the
leaves and creates an environment that discourages spoilage microbes. After rinsing, the cabbage
is coated with a paste of red pepper flakes called gochugaru, garlic, ginger, spring onions,
fish sauce or salted shrimp, and often a little sugar or grated pear. It is then packed tightly
into jars or crocks. At room temperature, lactic acid bacteria already present on the vegetables
begin to ferment the sugars, turning the kimchi sour and slightly fizzy within a day or two;
after that, it is usually stored in the refrigerator, where it keeps fermenting slowly for
weeks. Traditionally, families gathered in late autumn for gimjang, a communal day of making
enough kimchi to last through the winter, stored in earthenware pots buried in the ground. The
practice is recognised by UNESCO as part of humanity's intangible cultural heritage, and many
Korean homes now own a special refrigerator just for kimchi. There are hundreds of regional and
seasonal varieties. Kkakdugi is made from cubes of radish, oi sobagi from cucumbers stuffed with
seasoned vegetables, and baek kimchi, or white kimchi, leaves out the chilli entirely, giving a
mild, refreshing flavour. Aged, very sour kimchi is not wasted: it is used to cook stews,
pancakes and fried rice, where its acidity deepens the flavour of the dish.
"""),
    ('sport', 'How tennis is scored', """
Tennis has one of the most unusual scoring systems in sport. Points within a game are counted as
love, fifteen, thirty and forty, an order whose origins are uncertain; one theory links it to
the quarters of a clock face. A player who wins a point at forty wins the game, unless both
players reach forty, which is called deuce. From deuce, a player must win two points in a row:
the first gives them the advantage, and if they lose the next point the score returns to deuce.
Games are grouped into sets, and a set is won by the first player to take six games with a
margin of at least two. If the score reaches six games all, most competitions play a tiebreak,
in which points are counted normally and the first to seven points with a two-point lead takes
the set. Matches are usually best of three sets, although men's singles at the Grand Slam
tournaments are best of five. The server alternates each game, and because serving is a big
advantage, winning a game on the opponent's serve, known as a break of serve, is often the
decisive moment of a set. Some events experiment with shorter formats, such as sets to four
games or a match tiebreak played instead of a deciding set.
"""),
    ('history', 'Roman aqueducts', """
The aqueducts of ancient Rome were among the most impressive engineering works of the classical
world. Beginning with the Aqua Appia in 312 BC, the Romans built eleven major aqueducts to
supply the capital, carrying water from springs and rivers up to about ninety kilometres away.
Contrary to popular images, most of their length ran underground in channels cut through rock or
built of masonry, which protected the water from contamination and from enemies. The famous
arched bridges were only needed where the channel had to cross valleys. The entire system relied
on gravity alone, so the engineers had to maintain a gentle, steady downward slope over great
distances, sometimes less than a metre of fall per kilometre, using surveying instruments such
as the chorobates and the groma. At the city, water flowed into distribution tanks and then
through lead pipes to public fountains, baths, and the houses of wealthy citizens who paid for a
private supply. At their height, the aqueducts delivered hundreds of millions of litres each
day. Some of them, like the Pont du Gard in southern France and the aqueduct of Segovia in
Spain, still stand today. Maintaining the network required a large permanent workforce. The
water commissioner Frontinus, who was appointed in AD 97, wrote a detailed treatise describing
the aqueducts, their capacities and the fraud he found, such as illegal pipes secretly tapped
into the channels by landowners. Limestone deposits built up inside the channels and had to be
chipped away regularly, and when the city was besieged in the sixth century, attackers cut the
aqueducts, and Rome's population declined sharply.
"""),
    ('science', 'Coral bleaching', """
Coral reefs cover less than one percent of the ocean floor but shelter about a quarter of all
marine species. Reef-building corals live in partnership with microscopic algae called
zooxanthellae, which live inside their tissues, photosynthesise and supply most of the coral's
energy, as well as its bright colours. When the water becomes too warm for too long, this
partnership breaks down: the stressed algae produce harmful molecules, and the coral expels
them, leaving its white limestone skeleton visible through transparent tissue. This is known as
bleaching. A bleached coral is not dead, and if temperatures return to normal within a few
weeks, the algae can recolonise it. Prolonged or repeated heat stress, however, starves the
coral and leads to widespread death. Rising ocean temperatures caused by climate change have
made mass bleaching events far more frequent; the Great Barrier Reef suffered severe episodes in
2016, 2017, 2020, 2022 and 2024. Pollution, overfishing and ocean acidification add further
stress. Scientists are exploring ways to help, such as breeding heat-tolerant corals and
replanting damaged areas, but they stress that limiting warming is essential for reefs to
survive. Healthy reefs also protect coastlines from storm waves and support fisheries and
tourism worth billions of dollars each year.
"""),
    ('art', 'Impressionism', """
Impressionism was a movement in painting that began in France in the 1860s and 1870s. Its
artists, including Claude Monet, Pierre-Auguste Renoir, Camille Pissarro, Alfred Sisley and
Berthe Morisot, rejected the polished historical and mythological scenes favoured by the
official Salon in Paris. Instead they painted everyday modern life: boating parties, railway
stations, busy boulevards and landscapes, often working outdoors to capture the changing effects
of light and weather directly. They used quick, visible brushstrokes and placed pure colours
side by side rather than blending them smoothly, so that the eye of the viewer mixes them from a
distance. Shadows were painted with colour rather than with black or brown. After repeated
rejections by the Salon, the group organised its own independent exhibition in 1874. A critic
mocked them by taking the title of Monet's painting Impression, Sunrise and calling them
impressionists, and the name stuck. Later Monet painted series of the same subject, such as
haystacks, Rouen Cathedral and water lilies, at different times of day. The movement paved the
way for post-impressionists like Cezanne and Van Gogh and for much of modern art. Impressionism
was also shaped by new technology. Paint sold in portable metal tubes made painting outdoors
practical, and the spread of photography pushed painters to pursue what the camera could not
record, such as colour, movement and the fleeting sensation of a moment. Japanese woodblock
prints, which flooded into Paris after Japan opened its ports, inspired their flattened spaces,
bold cropping and unusual viewpoints.
"""),
    ('medicine', 'Vaccines and herd immunity', """
Vaccines train the immune system to recognise a pathogen without causing the disease itself.
They contain weakened or inactivated microbes, pieces of them such as proteins, or genetic
instructions, as in mRNA vaccines, that lead the body's cells to produce a harmless piece of the
pathogen. The immune system responds by making antibodies and memory cells, so that if the real
pathogen later appears it can be recognised and eliminated quickly. When a large enough share of
a population is immune, a disease cannot spread easily because each infected person, on average,
passes it to fewer than one other person. This is called herd immunity, and it protects people
who cannot be vaccinated, such as newborns or patients with weakened immune systems. The
threshold depends on how contagious the disease is: measles, one of the most contagious diseases
known, requires about ninety-five percent of people to be immune. Vaccination campaigns
eradicated smallpox in 1980 and have brought polio close to eradication. When vaccination rates
fall, however, outbreaks return, as several countries have seen with measles in recent years.
Vaccines are tested in large clinical trials before approval, and serious side effects are rare,
although monitoring systems continue to track safety once millions of doses have been given.
Some vaccines, such as those against influenza, must be updated regularly because the virus
changes quickly.
"""),
    ('programming', 'Indexes in relational databases', """
Relational databases store data in tables of rows and columns and are queried with SQL. Without
help, finding the rows that match a condition, such as all orders from a particular customer,
requires a full table scan that reads every row, which becomes slow as tables grow to millions
of rows. An index solves this in much the same way as the index at the back of a book. The most
common kind is a B-tree, a balanced tree structure that keeps keys sorted and lets the database
find any value, or a range of values, with only a few page reads. Indexes can cover several
columns, and the order of those columns matters: an index on last name and first name helps
queries that filter by last name, but not those that filter only by first name. Indexes are not
free. Each one takes disk space, and every insert, update or delete must also update every index
on the table, so write-heavy tables with many indexes become slower. The query planner decides
whether to use an index by estimating the cost of different plans from statistics about the
data, and developers read the output of commands such as EXPLAIN to check its choices. Other
index types serve special purposes. Hash indexes make exact lookups fast but cannot answer range
queries, bitmap indexes suit columns with few distinct values in analytical workloads, and
full-text indexes support searching for words inside long documents. A covering index contains
every column a query needs, so the database can answer it from the index alone without reading
the table at all.
"""),
    ('history', 'The Silk Road', """
The Silk Road was not a single road but a vast network of overland and maritime trade routes
that linked China with Central Asia, India, Persia, the Middle East and the Mediterranean for
more than fifteen hundred years. Its name was coined only in the nineteenth century by the
German geographer Ferdinand von Richthofen, after the Chinese silk that was among its most
prized goods. The overland routes took shape during the Han dynasty, in the second century BC,
when the envoy Zhang Qian travelled west and returned with reports of distant kingdoms and of
the swift horses of the Fergana Valley, which the Chinese court was eager to obtain for its
cavalry. Few merchants travelled the whole distance. Instead, goods passed from hand to hand
through a chain of oasis cities such as Kashgar, Samarkand and Bukhara, each adding its own
profit, so that silk reaching Rome was enormously expensive. Caravans of Bactrian camels carried
silk, porcelain, tea and paper westward, while gold, silver, glass, wool, horses and exotic
foods such as grapes and pomegranates travelled east. Just as important were the ideas,
religions and technologies that moved along the routes. Buddhism spread from India into Central
Asia and China, followed later by Nestorian Christianity, Manichaeism and Islam. Papermaking,
the compass and gunpowder gradually made their way west, and musical instruments, artistic
styles and crops travelled in both directions. The routes also carried disease: many historians
believe that the Black Death reached Europe in the fourteenth century along these trading
networks. The Silk Road flourished under the Tang dynasty and again in the thirteenth century,
when the Mongol Empire controlled most of the land between China and Eastern Europe and made
travel relatively safe, allowing merchants such as Marco Polo to make the journey. Its decline
came as the empire fragmented and as European sailors found sea routes to Asia around Africa,
which were cheaper for bulk goods. Today China's Belt and Road Initiative deliberately echoes
the name, investing in railways, ports and pipelines across the same regions. In 2014 UNESCO
added a long section of the routes through China, Kazakhstan and Kyrgyzstan to its World
Heritage List, recognising dozens of cities, forts and caravanserais along the corridor.
"""),
    ('history', 'The Industrial Revolution in Britain', """
The Industrial Revolution began in Britain in the second half of the eighteenth century and
transformed the way goods were made, where people lived and how they worked. Several conditions
came together there. Britain had abundant coal and iron ore, often close to each other, a
growing population, a large empire that supplied raw materials and markets, relatively secure
property rights, and banks willing to lend to entrepreneurs. Agricultural improvements, such as
crop rotation and the enclosure of common land, produced more food with fewer workers and pushed
many rural families towards the towns. The textile industry led the way. A series of inventions,
including John Kay's flying shuttle, James Hargreaves's spinning jenny, Richard Arkwright's
water frame and Samuel Crompton's spinning mule, multiplied the amount of thread one worker
could produce. Arkwright's mills at Cromford gathered hundreds of workers under one roof,
following the rhythm of machines rather than the seasons, and became the model of the factory
system. Steam power was the second great change. Thomas Newcomen's engine had pumped water from
mines since 1712, but James Watt's separate condenser, patented in 1769, made steam engines far
more efficient, and once they could drive rotating machinery, factories no longer had to be
built beside fast rivers. Coke replaced charcoal in iron smelting, making iron cheap enough for
bridges, machines and eventually rails. In 1825 the Stockton and Darlington Railway opened, and
within a few decades a national rail network had cut journey times and transport costs
dramatically. The human cost was heavy. Industrial cities such as Manchester grew so fast that
housing, water supplies and sanitation could not keep up, and cholera and tuberculosis spread
through crowded slums. Children as young as five worked long hours in mills and mines until a
series of Factory Acts limited their hours. Workers formed trade unions and campaigned for the
vote, while writers such as Charles Dickens and Friedrich Engels described the misery they saw.
Over the following century, however, rising productivity brought sustained growth in incomes
that had never occurred before in human history.
"""),
    ('science', 'Quantum entanglement', """
Quantum entanglement is a connection between particles in which the state of the whole system
cannot be described by the states of its parts separately. If two photons are produced together
in an entangled state, measuring the polarisation of one immediately tells you what a
measurement of the other will show, however far apart they are. Before measurement, neither
particle has a definite polarisation of its own; only the correlation between them is fixed.
Albert Einstein, Boris Podolsky and Nathan Rosen argued in a famous paper in 1935 that this
showed quantum mechanics to be incomplete. They believed that the particles must carry hidden
instructions from the start that determine the outcomes, since otherwise a measurement in one
place would seem to influence a distant one instantly, which Einstein called spooky action at a
distance. For decades the question seemed philosophical, until John Bell showed in 1964 that any
theory based on local hidden variables must obey certain statistical limits, now known as Bell
inequalities, while quantum mechanics predicts that entangled particles can violate them.
Experiments beginning in the 1970s, and especially those of Alain Aspect in the early 1980s,
found the violations that quantum theory predicted. Later experiments closed the remaining
loopholes, for example by choosing measurement settings randomly while the particles were in
flight and by separating detectors by more than a kilometre. Aspect, John Clauser and Anton
Zeilinger shared the Nobel Prize in Physics in 2022 for this work. Entanglement does not allow
faster-than-light communication, because the outcome at each end is random, and the correlation
only becomes visible when the two sets of results are compared through an ordinary channel. It
is nevertheless a practical resource. Quantum key distribution uses entangled photons to create
encryption keys whose secrecy is guaranteed by physics, since any eavesdropper disturbs the
correlations. Quantum computers rely on entangling many qubits to perform calculations that
would be impractical on classical machines, and quantum teleportation uses entanglement to
transfer the state of a particle to another one far away.
"""),
    ('medicine', 'Sleep and circadian rhythms', """
Almost every cell in the human body keeps time. A master clock in the suprachiasmatic nucleus, a
small group of neurons in the hypothalamus just above the point where the optic nerves cross,
coordinates these cellular clocks into a roughly twenty-four-hour cycle called the circadian
rhythm. At the molecular level, the clock is a feedback loop: certain genes produce proteins
that gradually accumulate and then switch off their own production, before degrading so that the
cycle can start again. Jeffrey Hall, Michael Rosbash and Michael Young received the Nobel Prize
in 2017 for uncovering this mechanism in fruit flies. Because the internal clock does not run at
exactly twenty-four hours, it must be reset every day, and light is the strongest signal.
Special cells in the retina detect light, especially blue light, and inform the master clock,
which in turn controls the release of the hormone melatonin from the pineal gland. Melatonin
rises in the evening as it grows dark and helps prepare the body for sleep. A second process,
sleep pressure, builds up the longer we stay awake, partly through the accumulation of a
molecule called adenosine; caffeine works by blocking adenosine receptors. Sleep itself cycles
through several stages roughly every ninety minutes. Deep slow-wave sleep dominates the first
part of the night and is important for physical recovery and for consolidating memories, while
rapid eye movement sleep, when most vivid dreaming occurs, becomes longer towards morning.
Adults generally need seven to nine hours, and teenagers, whose clocks naturally shift later,
need even more, which has led some schools to start lessons later in the morning. When the clock
and daily life are out of step, as in jet lag or night-shift work, people suffer from poor
sleep, reduced alertness and digestive problems. Long-term sleep deprivation and chronic
circadian disruption are linked to obesity, type 2 diabetes, cardiovascular disease, depression
and a weakened immune system. Good sleep habits include regular bedtimes, bright light in the
morning, and avoiding screens, caffeine and heavy meals late in the evening. People who still
struggle to sleep for weeks at a time should consult a doctor, since cognitive behavioural
therapy for insomnia works better in the long run than sleeping pills.
"""),
    ('law', 'Copyright and fair use', """
Copyright is a legal right that gives the creators of original works, such as books, music,
films, photographs, paintings and software, exclusive control over how those works are copied,
distributed, performed and adapted. It protects the particular expression of an idea, not the
idea itself: anyone may write a story about a boy wizard at a magical school, but not copy the
text of an existing novel. In most countries, copyright arises automatically as soon as a work
is fixed in a tangible form; registration is not required, though in the United States it is
needed before suing for infringement. The Berne Convention, first signed in 1886, requires its
members to protect works from other member countries on the same terms as their own. Protection
usually lasts for the life of the author plus seventy years, after which the work enters the
public domain and anyone may use it freely. Copyright is not absolute. Because strict control
over every use would harm education, criticism and creativity, the law allows certain unlicensed
uses. In the United States this is the doctrine of fair use, which courts assess by weighing
four factors: the purpose and character of the use, including whether it is commercial or
transformative; the nature of the copyrighted work; the amount and substantiality of the portion
used; and the effect of the use on the potential market for the original. Parody, news
reporting, teaching and scholarship often qualify, but no single factor decides the outcome,
which makes fair use flexible but hard to predict. Many other countries have narrower fair
dealing exceptions that list specific permitted purposes. Digital technology has made these
questions more pressing. In a long-running case, courts held that Google's scanning of millions
of library books to build a searchable index was fair use because it showed only short snippets
and served a different purpose from the books themselves. More recently, authors, artists and
news organisations have sued developers of artificial intelligence systems, arguing that
training models on their work without permission infringes their copyright, while the developers
argue that such training is a transformative fair use.
"""),
    ('music', 'Beethoven and the symphony', """
The symphony grew in the eighteenth century from the Italian opera overture, a short orchestral
piece in three sections, fast, slow and fast. Composers in Mannheim and Vienna expanded it into
an independent concert work, usually in four movements: a fast opening movement in sonata form,
a slow lyrical movement, a minuet and trio derived from dance, and a lively finale. Joseph
Haydn, who wrote more than one hundred symphonies while employed by the wealthy Esterhazy
family, did more than anyone to establish this form, and Wolfgang Amadeus Mozart brought it to
new heights of expressiveness in his last three symphonies, composed in a single summer in 1788.
Ludwig van Beethoven, who had studied briefly with Haydn in Vienna, transformed the genre. His
Third Symphony, the Eroica, completed in 1804, was far longer and more dramatic than anything
before it. Beethoven had originally dedicated it to Napoleon, but when Napoleon crowned himself
emperor he angrily scratched out the name on the title page. The Fifth Symphony, with its famous
four-note opening motif, travels from a stormy C minor to a triumphant C major finale, and
introduced trombones into the symphony orchestra. The Sixth, the Pastoral, depicts scenes of
country life, including a brook, birdsong and a thunderstorm. Beethoven also replaced the polite
minuet with the faster, more forceful scherzo. All of this was achieved while his hearing
steadily failed; by the time he wrote his Ninth Symphony he was almost completely deaf. At its
premiere in 1824 he could not hear the applause, and one of the singers had to turn him around
to see the audience cheering. The Ninth broke another convention by adding vocal soloists and a
chorus in its finale, setting Friedrich Schiller's poem Ode to Joy, whose melody is now the
anthem of the European Union. Beethoven's symphonies cast a long shadow over the nineteenth
century. Later composers such as Brahms, who waited more than twenty years before completing his
first symphony, felt their weight, while Mahler expanded the orchestra and the form even
further.
"""),
    ('cooking', 'The French mother sauces', """
Classical French cuisine organises its many sauces into families descended from a handful of
basic preparations known as the mother sauces. The system was first described by the chef
Marie-Antoine Careme in the early nineteenth century and later refined by Auguste Escoffier,
whose Guide Culinaire of 1903 listed the five mother sauces still taught in cooking schools
today. Bechamel is made by cooking flour in butter to form a white roux and then whisking in hot
milk until the sauce is smooth and thick; seasoned with nutmeg, it is the basis of lasagne and
croque monsieur, and with added cheese it becomes Mornay sauce. Veloute uses the same roux,
cooked slightly longer until it is pale gold, thinned with a light stock made from chicken, veal
or fish instead of milk. Espagnole is a rich brown sauce made from a dark roux, brown veal
stock, roasted bones and vegetables, and tomato; reduced with more stock, it becomes demi-glace,
the foundation of many classic meat sauces. Sauce tomate in Escoffier's version was thickened
with roux and flavoured with salt pork, although modern cooks usually simply simmer tomatoes
with aromatics and reduce them. Hollandaise is different from the others because it is an
emulsion rather than a starch-thickened sauce. Egg yolks are whisked with a little lemon juice
or reduced vinegar over gentle heat, and warm clarified butter is then added slowly so that the
fat is suspended in tiny droplets. If the sauce becomes too hot the eggs scramble, and if the
butter is added too quickly the emulsion breaks and separates; a broken hollandaise can often be
rescued by whisking it gradually into a fresh yolk. Adding tarragon and shallot reduction turns
hollandaise into bearnaise, the classic partner for steak. Each mother sauce gives rise to
dozens of small sauces by adding wine, herbs, cream, mushrooms or other flavourings, so a cook
who masters the five techniques can produce a huge repertoire. Modern chefs often prefer lighter
sauces based on reductions, purees or emulsified butter, but the logic of the mother sauces
still shapes professional training. Many restaurant kitchens still employ a dedicated sauce
cook, the saucier, a prestigious post in the traditional brigade system.
"""),
    ('sport', 'The Tour de France', """
The Tour de France is the most famous cycling race in the world and one of the largest annual
sporting events of any kind. It was first held in 1903, organised by the sports newspaper L'Auto
as a publicity stunt to increase its circulation. The first edition had six stages, some of them
longer than four hundred kilometres, and riders pedalled through the night on heavy bicycles
with a single gear. Today the race lasts three weeks in July and covers about three and a half
thousand kilometres in twenty-one stages, with two rest days. The route changes every year and
sometimes starts in another country, but the race always includes mountain stages in the Alps
and the Pyrenees, and traditionally finishes on the Champs-Elysees in Paris. Around twenty teams
of eight riders take part. The overall winner is the rider with the lowest total time across all
stages, and the leader wears the yellow jersey, introduced in 1919 and coloured to match the
paper on which L'Auto was printed. Other classifications are marked by their own jerseys: green
for the points competition, which favours sprinters who place well at stage finishes, the white
jersey with red dots for the best climber, and white for the best young rider. Although an
individual wins, cycling is a team sport. Teammates, called domestiques, shelter their leader
from the wind by riding in front, fetch food and water from team cars, and pace him up the
climbs, because riding in the slipstream of another cyclist saves as much as a third of the
effort. Time trials, in which riders race alone against the clock, test pure power without this
help. The race has been repeatedly damaged by doping scandals. In 1998 a team was expelled after
a large stock of banned drugs was found in one of its cars, and Lance Armstrong was later
stripped of the seven titles he had won between 1999 and 2005. Despite these scandals, millions
of spectators line the roads each year, many camping for days on the mountain passes, and the
race is broadcast to audiences in around two hundred countries.
"""),
    ('programming', 'Public-key cryptography', """
Public-key cryptography solves a problem that puzzled cryptographers for centuries: how can two
people who have never met agree on a secret key over a channel that anyone can listen to? In
traditional symmetric encryption, the same key is used to encrypt and decrypt, so it must
somehow be shared in advance. In 1976 Whitfield Diffie and Martin Hellman published a method,
now called Diffie-Hellman key exchange, that lets two parties each combine a private number with
public values so that both arrive at the same shared secret, while an eavesdropper who sees all
the exchanged messages cannot feasibly compute it. The following year Ron Rivest, Adi Shamir and
Leonard Adleman described RSA, the first practical public-key encryption and signature system.
In RSA, each user has a pair of keys. The public key can be published for anyone to use to
encrypt a message, but only the matching private key can decrypt it. The security rests on the
difficulty of factoring the product of two very large prime numbers: multiplying them is easy,
but recovering them from the product is believed to be infeasible for numbers thousands of bits
long. The same key pairs make digital signatures possible. A signer uses the private key to
produce a signature on a message, and anyone with the public key can verify that the message was
signed by the owner of that key and was not modified afterwards. To be sure that a public key
really belongs to a particular website, browsers rely on certificates issued by trusted
certificate authorities, which vouch for the link between a domain name and a key. Public-key
operations are slow compared with symmetric ciphers, so real protocols such as TLS, which
secures web traffic, use them only to authenticate the parties and agree on a fresh symmetric
key for the rest of the session. Modern systems increasingly use elliptic curve cryptography,
which gives equivalent security with much smaller keys. A sufficiently large quantum computer
could break both RSA and elliptic curves using Shor's algorithm, so standards bodies have begun
adopting new post-quantum algorithms based on different mathematical problems. The history has a
twist: researchers at the British intelligence agency GCHQ had discovered equivalent methods
several years earlier, but their work stayed classified until 1997.
"""),
    ('science', 'How volcanoes erupt', """
A volcano is an opening in the Earth's crust through which molten rock, gases and fragments of
rock escape from below. Most volcanoes form at the boundaries of tectonic plates. At mid-ocean
ridges, where plates move apart, the mantle rises and partially melts as the pressure on it
falls. At subduction zones, where an oceanic plate sinks beneath another plate, water released
from the descending slab lowers the melting point of the mantle above it, producing the magma
that feeds chains of volcanoes such as those around the Pacific Ring of Fire. Some volcanoes,
like those of Hawaii, sit far from plate boundaries above hotspots, plumes of unusually hot
material rising from deep in the mantle. The style of an eruption depends largely on the magma's
viscosity and gas content. Basaltic magma is hot, runny and low in silica, so gas bubbles escape
easily and eruptions tend to be effusive, with lava fountains and rivers of lava that build
broad, gently sloping shield volcanoes. Magma rich in silica, such as andesite and rhyolite, is
thick and sticky and traps dissolved gases. As it rises and the pressure drops, the gas comes
out of solution, like bubbles in a bottle of fizzy drink when the cap is removed, and can blast
the magma into ash and pumice in violent explosive eruptions. These build steep stratovolcanoes
of alternating layers of ash and lava, such as Mount Fuji and Mount St Helens. The most
dangerous hazards include pyroclastic flows, fast avalanches of hot gas and ash that destroyed
the Roman towns of Pompeii and Herculaneum in AD 79, and lahars, mudflows of volcanic debris
mixed with water. Large eruptions can also affect the global climate: the eruption of Tambora in
Indonesia in 1815 put so much sulphur into the stratosphere that 1816 became known in Europe and
North America as the year without a summer, with crop failures and famine. Volcanologists
monitor active volcanoes with seismometers, satellite measurements of ground deformation and
instruments that measure gases, and although exact forecasts remain difficult, warnings have
saved many lives.
"""),
    ('science', 'Evolution by natural selection', """
The theory of evolution by natural selection explains how living things change over generations
and how the enormous diversity of life arose from common ancestors. Charles Darwin developed the
idea after his voyage on HMS Beagle in the 1830s, during which he collected fossils and observed
how species differed from island to island in the Galapagos, and he refined it for two decades
before publishing On the Origin of Species in 1859, prompted by a letter from Alfred Russel
Wallace, who had independently reached the same conclusion. The argument rests on a few
observations. Individuals within a species vary, and much of that variation is inherited.
Organisms produce more offspring than can survive, so there is competition for food, mates and
shelter. Individuals whose inherited traits suit their environment slightly better tend to
survive and reproduce more, so those traits become more common in later generations. Over long
periods, these small changes accumulate and can produce new species, especially when populations
are separated and adapt to different conditions. Darwin did not know how inheritance worked. The
missing piece came from Gregor Mendel's experiments with pea plants, which showed that traits
are passed on in discrete units, later called genes, and in the twentieth century the
combination of genetics and natural selection became known as the modern synthesis. The
discovery of the structure of DNA in 1953 revealed the physical basis of heredity and of the
mutations that create new variation. Evidence for evolution comes from many independent sources:
the fossil record, which contains transitional forms such as early whales with legs; comparative
anatomy, which reveals the same bone structure in the arm of a human, the wing of a bat and the
flipper of a whale; the geographic distribution of species; and DNA sequences, which allow
biologists to reconstruct family trees of organisms. Evolution can also be observed directly,
for example in bacteria that become resistant to antibiotics, insects that evolve resistance to
pesticides, and the beaks of Galapagos finches, which changed measurably in size after droughts
altered the seeds available to them.
"""),
    ('art', 'The exposure triangle in photography', """
Every photograph depends on how much light reaches the camera's sensor, and photographers
control that exposure with three settings that are often described as a triangle: aperture,
shutter speed and ISO. The aperture is the opening inside the lens through which light passes.
It is measured in f-numbers, where a smaller number such as f/1.8 means a wider opening that
lets in more light, and a larger number such as f/16 a narrower one. Aperture also controls
depth of field, the range of distances that appear sharp. A wide aperture blurs the background
and isolates the subject, which suits portraits, while a narrow aperture keeps everything from
the foreground to the horizon in focus, which landscape photographers usually want. Shutter
speed is the length of time the shutter stays open, from many seconds down to a few thousandths
of a second. Fast speeds freeze motion, such as a bird in flight or a footballer striking the
ball, while slow speeds blur anything that moves, turning waterfalls into silky streams and car
headlights into trails of light at night. Slow speeds also make camera shake visible, so a
common rule of thumb for handheld shooting is to use a shutter speed no slower than one over the
focal length of the lens, unless the lens or camera has image stabilisation. ISO sets how
strongly the sensor's signal is amplified. Raising it allows shooting in dim light without a
tripod, but amplifies noise too, giving grainy images with less detail and duller colours. Each
full step in any of the three settings doubles or halves the light, so they can be traded
against each other: opening the aperture by one stop while making the shutter speed twice as
fast gives the same exposure but a shallower depth of field and sharper motion. Automatic modes
make these choices for the photographer, while aperture priority and shutter priority modes let
the photographer fix one setting and the camera adjust the other. Understanding the trade-offs
lets photographers choose deliberately which qualities matter most in each picture rather than
accepting the camera's compromise.
"""),
    ('society', 'Urban planning and public transport', """
Urban planning shapes how cities grow, where people live and work, and how they move between the
two. For much of the twentieth century, planners in many countries, especially in North America,
designed cities around the private car. Zoning rules separated homes from shops and offices,
suburbs spread outwards at low density, and wide motorways were driven through city centres,
often demolishing poorer neighbourhoods. The result was a pattern in which most trips required a
car, traffic congestion grew despite new roads, and people who could not drive, such as
children, the elderly and those on low incomes, had limited access to jobs and services.
Transport researchers describe a phenomenon called induced demand: adding road capacity makes
driving more attractive, so traffic increases until the new lanes are congested again. Since the
1970s, many cities have changed course. Copenhagen and Amsterdam built extensive networks of
protected cycle lanes, and today a large share of commuters there travel by bicycle. Curitiba in
Brazil pioneered bus rapid transit, in which buses run in dedicated lanes with stations where
passengers pay before boarding, giving much of the speed of a metro at a fraction of the cost.
Planners increasingly promote transit-oriented development, concentrating homes, offices and
shops within walking distance of stations, and mixed-use zoning that allows people to live close
to where they work and shop. The idea of the fifteen-minute city, popularised by the researcher
Carlos Moreno and adopted by the mayor of Paris, holds that daily needs should be reachable
within a short walk or bike ride. Such policies are not without controversy. Critics argue that
restrictions on cars harm people who depend on them, and new transit lines can raise property
values so much that existing residents are pushed out, a process known as gentrification.
Building new housing near transit often faces opposition from existing neighbours. Nevertheless,
with growing concern about climate change, air pollution and public health, many cities are
reallocating street space from cars to pedestrians, cyclists and buses.
"""),
    ('science', 'The carbon cycle and climate change', """
Carbon moves continually between the atmosphere, the oceans, living things and the rocks of the
Earth's crust, a set of exchanges known as the carbon cycle. Plants and phytoplankton take
carbon dioxide from the air and water through photosynthesis, and release it again when they
respire, decay or burn. The oceans absorb large amounts of carbon dioxide at their surface, and
some of it is carried to the deep sea, where it can remain for centuries, while over millions of
years carbon is locked into limestone and fossil fuels and slowly released again by volcanoes.
Before the industrial era, these flows were roughly in balance, and the concentration of carbon
dioxide in the atmosphere stayed around two hundred and eighty parts per million. By burning
coal, oil and gas, and by clearing forests, humans have released carbon that had been stored for
millions of years, and the concentration has now passed four hundred and twenty parts per
million, higher than at any time in at least eight hundred thousand years, as shown by air
bubbles trapped in Antarctic ice cores. Carbon dioxide is a greenhouse gas: it lets sunlight
through but absorbs some of the infrared radiation the Earth emits, warming the lower
atmosphere. The basic physics was established in the nineteenth century by scientists such as
John Tyndall and Svante Arrhenius. The planet has already warmed by about one point two degrees
Celsius since pre-industrial times. The consequences include more frequent and intense
heatwaves, heavier rainfall in many regions, droughts in others, melting glaciers and ice
sheets, and rising sea levels as water expands and ice melts. About a quarter of the carbon
dioxide emitted each year is taken up by the oceans, which slows the warming but makes seawater
more acidic, threatening shellfish and corals. Feedbacks can amplify the change: melting sea ice
exposes dark ocean that absorbs more sunlight, and thawing permafrost may release further carbon
dioxide and methane. Under the Paris Agreement of 2015, countries committed to limiting warming
to well below two degrees, which requires cutting emissions rapidly and reaching net zero around
the middle of the century.
"""),
    ('history', 'Building the pyramids of Giza', """
The pyramids of Giza, on the edge of the desert outside modern Cairo, are the most famous
monuments of ancient Egypt and the only one of the Seven Wonders of the Ancient World that still
survives. The largest, the Great Pyramid, was built for the pharaoh Khufu around 2560 BC during
the Fourth Dynasty. It originally rose about one hundred and forty-six metres and remained the
tallest human-made structure on Earth for almost four thousand years. It contains an estimated
two point three million blocks of limestone and granite, some weighing many tonnes, and its
sides are aligned with remarkable accuracy to the four points of the compass. Two smaller
pyramids nearby belong to Khufu's son Khafre, whose complex includes the Great Sphinx, and to
Menkaure. The pyramids were tombs, part of complexes that also included temples and causeways,
intended to protect the king's body and help him reach the afterlife. They developed from
earlier designs: the step pyramid of Djoser at Saqqara, designed by the architect Imhotep,
stacked six flat platforms, and Khufu's father Sneferu built several pyramids, including the
oddly shaped Bent Pyramid, whose angle changes partway up, as his builders learned how to make
smooth sides. Despite popular myths, the pyramids were not built by slaves. Excavations of a
workers' village nearby found bakeries, breweries, sleeping quarters and cemeteries where
workers were buried with honour near the king's tomb, and skeletons that show treated injuries.
A permanent skilled workforce was probably joined by rotating crews of labourers from across the
country. Limestone was quarried nearby, while fine white limestone for the outer casing came
from Tura across the Nile, and granite from Aswan, hundreds of kilometres south, was floated
down the river on boats. A papyrus diary discovered in 2013 records an official named Merer
transporting stone blocks by boat for the Great Pyramid. How exactly the blocks were raised is
still debated; most archaeologists favour systems of ramps combined with sledges, levers and
wetted sand to reduce friction. The smooth casing stones were later removed for building
material in medieval Cairo, leaving the stepped surfaces visible today. Modern surveys using
cosmic-ray muons have even detected a large hidden void above the Grand Gallery, whose purpose
is unknown.
"""),
    ('programming', 'Overfitting and regularisation in machine learning', """
In machine learning, a model is trained to fit a set of examples in the hope that it will make
good predictions on new data it has never seen. The central danger is overfitting: a
sufficiently flexible model can learn the noise and accidental details of its training data as
well as the genuine patterns, achieving a very low error on the training set while performing
poorly on new examples. The opposite failure, underfitting, occurs when a model is too simple to
capture the real structure, such as a straight line fitted to data that follow a curve.
Balancing the two is often described as the bias-variance trade-off. To detect overfitting,
practitioners hold back part of the data as a validation set that is never used for training,
and monitor the error on it; when the training error keeps falling but the validation error
starts to rise, the model has begun to memorise. A separate test set, used only once at the end,
gives an honest estimate of final performance, and cross-validation rotates the held-out portion
to make better use of small datasets. Many techniques, collectively called regularisation,
reduce overfitting. Weight decay, or L2 regularisation, adds a penalty proportional to the
squared size of the model's parameters, encouraging smaller weights and smoother functions,
while L1 regularisation pushes many weights to exactly zero, producing sparse models. Early
stopping simply halts training when the validation error stops improving. In neural networks,
dropout randomly switches off a fraction of the units during each training step, preventing the
network from relying too heavily on any single feature. Data augmentation creates additional
training examples by transforming existing ones, for instance by flipping, cropping or slightly
rotating images. Collecting more data is often the most effective remedy of all. Interestingly,
very large modern neural networks can have far more parameters than training examples and still
generalise well, and researchers have observed a double descent curve in which the test error
falls again as models grow beyond the point where they can fit the training data perfectly, a
phenomenon that has prompted new theoretical work on why deep learning works.
"""),
)

_QUERIES = (
    ('Why does coffee taste bitter when the beans are ground too finely for the machine?',
     'Pulling a shot of espresso'),
    ('How do bees tell each other where the flowers are?',
     'The honeybee waggle dance'),
    ('the court order that makes a jailer justify keeping someone locked up',
     'Habeas corpus'),
    ("when is a forward penalised for standing too close to the other team's goal",
     'The offside rule in football'),
    ('a hormone extracted in Toronto in the 1920s that saved people with diabetes',
     'Insulin and type 1 diabetes'),
    ('how a runtime automatically frees objects that nothing refers to any more',
     'Garbage collection'),
    ('why savings grow exponentially when the interest is reinvested',
     'Compound interest'),
    ('collapsed stars whose gravity is so strong that light cannot get out',
     'Black holes'),
    ('how to make queries faster when a table has millions of rows',
     'Indexes in relational databases'),
    ('germs that no longer respond to drugs because medicines are overused',
     'Antibiotic resistance'),
    ('spicy fermented cabbage from Korea',
     'Making kimchi'),
    ('why the sea at the coast comes in and goes out twice a day',
     'Why the tides rise and fall'),
    ('Monet and the painters who captured light with loose brushwork',
     'Impressionism'),
    ('what deuce and advantage mean in a racket sport',
     'How tennis is scored'),
    ('warmer seas make reefs lose their colour',
     'Coral bleaching'),
    ('what makes an agreement between two parties enforceable in court',
     'Forming a contract'),
    ('ancient caravan trade between China and the Mediterranean',
     'The Silk Road'),
    ("Einstein's spooky action at a distance and the Bell test experiments",
     'Quantum entanglement'),
    ('why we feel sleepy at night and how the body clock is reset',
     'Sleep and circadian rhythms'),
    ("using someone else's creative work without permission for parody or criticism",
     'Copyright and fair use'),
    ('the three-week bicycle race around France and its yellow jersey',
     'The Tour de France'),
    ('how two strangers can agree on a secret encryption key over the internet',
     'Public-key cryptography'),
    ('a model that memorises its training examples and fails on new data',
     'Overfitting and regularisation in machine learning'),
    ('how aperture, shutter speed and ISO change a picture',
     'The exposure triangle in photography'),
)

PASSAGES: tuple[Passage, ...] = tuple(
    Passage(topic, title, " ".join(text.split())) for topic, title, text in _PASSAGES)
_INDEX = {p.title: i for i, p in enumerate(PASSAGES)}
QUERIES: tuple[Query, ...] = tuple(Query(text, _INDEX[title]) for text, title in _QUERIES)

__all__ = ["PASSAGES", "QUERIES", "Passage", "Query"]
